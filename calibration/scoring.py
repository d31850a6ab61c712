"""Score image sets with a built artifact through the runtime's own backend.

Thresholds and the accuracy guard must judge the artifact that will run on the line
(FP16/INT8 ONNX, TensorRT plan), never the PyTorch model it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pouta.edge.backend import Backend

from .calibset import ImageSet
from .thresholds import PixelHistogram


@dataclass
class Scores:
    scores: np.ndarray  # [N] float64
    pixels: PixelHistogram | None


def score_set(
    backend: Backend,
    images: ImageSet,
    batch_size: int = 8,
    collect_pixels: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Scores:
    out: list[np.ndarray] = []
    hist = PixelHistogram() if collect_pixels else None
    done = 0
    for batch in images.batches(batch_size):
        amap, score = backend.run(batch)
        out.append(np.asarray(score, dtype=np.float64).reshape(-1))
        if hist is not None:
            hist.add(amap)
        done += batch.shape[0]
        if progress is not None:
            progress(done, len(images))
    return Scores(np.concatenate(out) if out else np.zeros(0), hist)
