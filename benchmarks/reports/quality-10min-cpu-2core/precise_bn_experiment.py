"""Probe: do POUTA's tiled false positives come from noisy BatchNorm running statistics?

Re-estimates every BatchNorm's running mean/variance as a plain average over 200 training
batches of 4 (synthetic anomalies as in training), then evaluates like ``pouta-eval``.

    python precise_bn_experiment.py CHECKPOINT OUT.json   (from the repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import open_dataset
from pouta.trainer.evaluate import evaluate, torch_scorer
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.training_set import (
    TrainingSet,
    build_training_set,
    single_threaded_opencv,
    training_paths,
)

N_BATCHES, BATCH = 200, 4


@torch.no_grad()
def precise_bn(model: torch.nn.Module, dataset: TrainingSet, n_batches: int = N_BATCHES) -> None:
    """Every BatchNorm's running statistics re-estimated as a plain mean over ``n_batches``
    training batches of ``BATCH`` (synthetic anomalies as in training); leaves eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    idx = np.random.default_rng(1).integers(0, len(dataset), n_batches * BATCH)
    for b in range(n_batches):
        model(torch.stack([dataset[int(j)]["image"] for j in idx[b * BATCH : (b + 1) * BATCH]]))
    model.eval()


def main(checkpoint: str, out: Path) -> None:
    torch.set_num_threads(2)
    single_threaded_opencv()
    model, mcfg, info = load_model(checkpoint)
    cfg = info["train_config"]
    dataset, _ = build_training_set(cfg, mcfg, training_paths(cfg))
    precise_bn(model, dataset)
    d = cfg["data"]
    test = open_dataset(d["root"], split="test", layout=d["layout"], category=d["category"])
    pre = preprocessor_for_training(cfg, mcfg.height, mcfg.width)
    res = evaluate(torch_scorer(model), test, pre, progress=False)
    row = {k: res.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}
    print(checkpoint, row)
    out.write_text(json.dumps({"checkpoint": checkpoint, "precise_bn": [N_BATCHES, BATCH], **row}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
