"""Demo runs trained with the weight average (``weight_average_experiment.patch`` applied):
the average (model.pt) vs the last weights (last.pt) of the same run, FP32 in PyTorch.

``python demo_weight_average_pair.py DEMO_OUT`` (a ``pouta-demo --out DEMO_OUT`` folder):
scores the 40 held-out good parts the demo calibrates on, sets the demo's default threshold
(max x 1.1, ``normal-max-margin``) for each weight set, and counts right verdicts on the 45
test parts; the last weights get their own cue scales, fitted as ``pouta-train`` fits them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from pouta.trainer.checkpoint import load_model, read_checkpoint
from pouta.trainer.data import open_dataset
from pouta.trainer.evaluate import evaluate, torch_scorer
from pouta.trainer.geometry import preprocessor_for_training
from weight_average_probe import last_weights  # beside this script

MARGIN = 1.1


def main(run: Path) -> None:
    torch.set_num_threads(2)
    average, cfg, info = load_model(run / "train" / "model.pt")
    train_cfg = info["train_config"]
    pre = preprocessor_for_training(train_cfg, cfg.height, cfg.width)
    last = last_weights(read_checkpoint(run / "train" / "last.pt"), cfg, train_cfg)
    calib = open_dataset(str(run / "holdout" / "surface"), split="train")
    test = open_dataset(str(run / "data" / "surface"), split="test")
    for name, model in (("average", average), ("last", last)):
        with torch.no_grad():
            normal = [
                float(model(torch.from_numpy(calib.load(i, pre)[0][None]), aux=False).score[0])
                for i in range(len(calib.records))
            ]
        report = evaluate(torch_scorer(model), test, pre, progress=False)
        scores = np.array([r["score"] for r in report["scores"]])
        defect = np.array([r["label"] for r in report["scores"]]).astype(bool)
        threshold = max(normal) * MARGIN
        right = int(((scores > threshold) == defect).sum())
        print(
            f"{run.name} {name}: image AUROC {report['image_auroc']:.3f}, calibration max {max(normal):.3f}, "
            f"threshold {threshold:.3f}, test good max {scores[~defect].max():.3f}, "
            f"defect min {scores[defect].min():.3f}, right {right} / {len(scores)}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
