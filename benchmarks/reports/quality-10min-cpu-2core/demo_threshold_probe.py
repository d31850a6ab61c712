"""Where a demo run's artifacts put good and defective parts, and where the threshold lies.

For each ARTIFACT (an ONNX file of README's demo, with or without calibrated thresholds):
image AUROC over the demo's labelled test parts, the highest good test score, the lowest
defect score, the highest score of the 40 held-out good parts the threshold is calibrated
on, the artifact's image threshold, and how many defects score above that held-out maximum
(what a threshold at the maximum with no margin would catch). Scores as the runtime
computes them (``calibration.scoring.score_set``).

    python demo_threshold_probe.py DEMO_DIR ARTIFACT...        (repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pouta.calibration.calibset import load_image_set
from pouta.calibration.scoring import score_set
from pouta.edge.backend import OnnxRuntimeBackend
from pouta.edge.metadata import load_for_model
from pouta.edge.preprocess import preprocessor_for
from pouta.trainer.metrics import roc_auc


def main(argv: list[str]) -> int:
    demo, artifacts = Path(argv[0]), argv[1:]
    test = demo / "data" / "surface" / "test"
    for artifact in artifacts:
        meta = load_for_model(artifact)
        pre = preprocessor_for(meta)
        backend = OnnxRuntimeBackend(artifact, metadata=meta)
        scores: list[float] = []
        labels: list[int] = []
        for sub in sorted(p for p in test.iterdir() if p.is_dir()):
            s = score_set(backend, load_image_set(sub, pre, n=None, min_images=1, what="test")).scores
            scores += list(s)
            labels += [int(sub.name != "good")] * len(s)
        y, s = np.array(labels), np.array(scores)
        held_out = load_image_set(demo / "holdout" / "surface" / "train" / "good", pre, n=None, min_images=1)
        top = float(score_set(backend, held_out).scores.max())
        thr = f"{meta.thresholds.image:.3f}" if meta.thresholds else "-"
        print(
            f"{artifact}: AUROC {roc_auc(y, s):.3f}, good test max {s[y == 0].max():.3f}, "
            f"defect min {s[y == 1].min():.3f}, held-out good max {top:.3f}, threshold {thr}, "
            f"defects above the held-out max {int((s[y == 1] > top).sum())} / {int(y.sum())}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
