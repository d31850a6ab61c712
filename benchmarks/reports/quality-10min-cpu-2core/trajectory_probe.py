"""Probe: how each cue ranks real defects along one training run (checkpoints every 100 steps).

``pouta-train`` rewrites ``last.pt`` every 100 steps; copies of it taken while a default
10-minute run trains (``while sleep 3; do cp -n RUN/last.pt CK/last_$(stat -c %Y
RUN/last.pt).pt; done`` beside ``pouta-train --data DATA --time-limit-min 10 --out RUN``),
plus the final ``model.pt``, are scored here like ``cue_fusion_probe.py`` does: the
discriminator's map alone, the reconstruction error alone and the model's fusion, with the
cue scales fitted on the 64 normal training inputs for every checkpoint (mid-run ones have
none). ``--precise-bn`` first re-estimates every BatchNorm's running statistics as a plain
mean over 100 training batches of 4 (synthetic anomalies as in training), which tells the
noise of the running statistics at a high learning rate apart from the weights' own.

    python trajectory_probe.py [--precise-bn] DATA OUT.jsonl CHECKPOINT...   (repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import open_dataset
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.metrics import roc_auc
from pouta.trainer.train import CUE_FIT_INPUTS
from pouta.trainer.training_set import build_training_set, training_paths

sys.path.insert(0, str(Path(__file__).parent))
from cue_fusion_probe import append_row, cue_maps, pooled_max
from precise_bn_experiment import precise_bn

BN_BATCHES = 100


def main(argv: list[str]) -> int:
    bn = argv[0] == "--precise-bn"
    data, out, checkpoints = argv[bn], Path(argv[bn + 1]), argv[bn + 2 :]
    torch.set_num_threads(2)
    dataset = normal = images = labels = None
    for ck in checkpoints:
        model, cfg, info = load_model(ck)
        if dataset is None:  # every checkpoint of one run shares data and geometry
            train_cfg = info["train_config"]
            dataset, _ = build_training_set(train_cfg, cfg, training_paths(train_cfg))
            normal = dataset.normal_inputs(CUE_FIT_INPUTS)
            pre = preprocessor_for_training(train_cfg, int(cfg.height), int(cfg.width))
            test = open_dataset(data, split="test")
            images = np.stack([test.load(i, pre)[0] for i in range(len(test.records))])
            labels = np.array([r.label for r in test.records])
        if bn:
            precise_bn(model, dataset, BN_BATCHES)
        a_n, r_n = cue_maps(model, normal)
        k_a, k_r = float(pooled_max(a_n).mean()), float(pooled_max(r_n).mean())
        a, r = (
            np.concatenate(v)
            for v in zip(
                *(cue_maps(model, images[i : i + 16]) for i in range(0, len(images), 16)), strict=True
            )
        )
        row = {
            "checkpoint": ck,
            "step": info["step"],
            "precise_bn": bn,
            "image_auroc": {
                "disc": round(roc_auc(labels, pooled_max(a)), 4),
                "rec": round(roc_auc(labels, pooled_max(r)), 4),
                "fused": round(roc_auc(labels, pooled_max(0.5 * (a / (a + k_a) + r / (r + k_r)))), 4),
            },
        }
        append_row(out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
