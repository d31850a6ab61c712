"""Same weights, another reconstruction-cue error: refit the cue scales, save a checkpoint.

Loads CHECKPOINT, turns the cue on (a tiled model has it off by default), sets
``model.cue_error`` to ERROR (``ssim`` or ``squared``), fits the cue
scales on the run's 64 normal training inputs exactly as ``pouta-train`` does at the end of
a run, and writes OUT (export, calibrate and evaluate it like any checkpoint).

    python cue_error_refit.py CHECKPOINT ERROR OUT.pt        (repository root)
"""

from __future__ import annotations

import sys

import torch
from pouta.trainer.checkpoint import load_model, save_checkpoint
from pouta.trainer.models import build_model, fit_cue_scales
from pouta.trainer.train import CUE_FIT_INPUTS
from pouta.trainer.training_set import build_training_set, training_paths

BATCH = 16


def main(argv: list[str]) -> int:
    src, error, dst = argv
    torch.set_num_threads(2)
    model, cfg, info = load_model(src)
    refit = build_model(cfg.with_(reconstruction_cue=True, cue_error=error, cue_scales=None)).eval()
    refit.load_state_dict(model.state_dict())
    train_cfg = info["train_config"]
    dataset, _ = build_training_set(train_cfg, refit.cfg, training_paths(train_cfg))
    x = torch.from_numpy(dataset.normal_inputs(CUE_FIT_INPUTS))
    k_a, k_r = fit_cue_scales(refit, [x[i : i + BATCH] for i in range(0, len(x), BATCH)])
    print(f"{src} -> {dst}: cue_error {error}, cue scales {k_a:.4g}, {k_r:.4g}")
    train_cfg["model"] = refit.cfg.to_dict()
    save_checkpoint(
        dst,
        refit,
        refit.cfg,
        step=int(info.get("step", 0)),
        train_config=train_cfg,
        info=info.get("info", {}),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
