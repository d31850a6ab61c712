"""Score image sets with a built artifact through the runtime's own backend.

Thresholds and the accuracy guard must judge the artifact that will run on the line
(FP16/INT8 ONNX, TensorRT plan), never the PyTorch model it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pouta.edge.backends.protocol import Backend
from pouta.edge.contract.geometry import score_frames

from .calibset import ImageSet
from .thresholds.rules import PixelHistogram


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
    """Image scores (and the pixel histogram of the maps) exactly as the runtime computes them:
    tiled models stitch their tiles and take the pooled max of the stitched map."""
    out: list[float] = []
    hist = PixelHistogram() if collect_pixels else None
    for work_map, score in score_frames(backend.run, images.frames(), batch_size):
        out.append(score)
        if hist is not None:
            hist.add(work_map)
        if progress is not None:
            progress(len(out), len(images))
    return Scores(np.asarray(out, dtype=np.float64), hist)
