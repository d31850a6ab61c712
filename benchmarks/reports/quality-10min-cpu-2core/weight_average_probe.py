"""The weights' moving average vs the last weights, on one training run.

Needs ``weight_average_experiment.patch`` applied (a dropped experiment: ``train.ema_decay``,
``model.pt`` = the moving average; not in the code since pass 8 measured it).

``python weight_average_probe.py RUN_DIR DATA [--out rows.jsonl]``

``RUN_DIR/model.pt`` holds the moving average (``train.ema_decay``) and ``RUN_DIR/last.pt``
the last weights of the same run. Both are evaluated as ``pouta-eval`` does; the last
weights get their own reconstruction-cue scales, fitted on the same normal training inputs
as ``pouta-train`` fits them. One trajectory, two read-outs: the difference is the
average's own effect, free of the run-to-run spread between separate trainings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from pouta.trainer.checkpoint import load_model, read_checkpoint
from pouta.trainer.data import open_dataset
from pouta.trainer.evaluate import evaluate, torch_scorer
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.models import ModelConfig, build_model
from pouta.trainer.train import _fit_cues
from pouta.trainer.training_set import build_training_set, training_paths


def last_weights(last_ck: dict[str, Any], cfg: ModelConfig, train_cfg: dict[str, Any]) -> torch.nn.Module:
    """The model the code without the average delivers from this run: the last weights,
    with cue scales fitted as ``pouta-train`` fits them (when the model has the cue)."""
    last = build_model(cfg.with_(cue_scales=None)).eval()
    last.load_state_dict(last_ck["model"])
    if cfg.reconstruction_cue:
        dataset, _ = build_training_set(train_cfg, cfg, training_paths(train_cfg))
        _fit_cues(last, dataset, torch.device("cpu"), torch.contiguous_format)
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("data")
    ap.add_argument("--out", default=None, help="append one JSON row per weight set here")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    average, cfg, info = load_model(a.run_dir / "model.pt")
    last_ck = read_checkpoint(a.run_dir / "last.pt")
    if "weight_average" not in last_ck:
        raise SystemExit(f"{a.run_dir}/last.pt: trained without train.ema_decay (no average stored)")
    train_cfg = info["train_config"]
    pre = preprocessor_for_training(train_cfg, int(cfg.height), int(cfg.width))
    last = last_weights(last_ck, cfg, train_cfg)
    test = open_dataset(a.data, split="test")
    rows = []
    for name, model in (("moving average (model.pt)", average), ("last weights (last.pt)", last)):
        res = evaluate(torch_scorer(model), test, pre, progress=False)
        rows.append(
            {
                "run": str(a.run_dir),
                "steps": info.get("step"),
                "weights": name,
                "ema_decay": train_cfg["train"]["ema_decay"],
                "cue_scales": None if model.cfg.cue_scales is None else list(model.cfg.cue_scales),
                **{k: res[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")},
            }
        )
    for row in rows:
        line = json.dumps(row)
        print(line)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
