"""Probe: does the image score's pool size or the map blur's shape hold quality back?

Same trained weights, evaluated like ``pouta-eval``, three variations:

- ``pool``: image AUROC when the image score is the max of a k x k average pool (k = 1 ..
  41; the contract's is 21) of the very same maps.
- ``blur``: the fixed Gaussian map blur (``model.map_sigma``, 4 map px) at sigma 0, 2, 4, 8,
  and "isotropic on the part": sigma 4 along the axis the input shrinks least, and along
  the other axis sigma scaled by the ratio of the two axes' downscale factors, so the blur
  covers the same source pixels both ways (a 4096x256 fabric squashed to 128x128: sigma 4
  rows, 0.25 columns). The reconstruction cue's scales are re-fitted on up to 64 training
  images for each blur, as ``pouta-train`` does after training.

    python score_map_probe.py CHECKPOINT DATA OUT.jsonl [pool|blur ...]   (repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pouta.edge.geometry import pooled_max, score_frames
from pouta.trainer.checkpoint import read_checkpoint
from pouta.trainer.data import open_dataset
from pouta.trainer.evaluate import evaluate, torch_scorer
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.metrics import roc_auc
from pouta.trainer.models import build_model, fit_cue_scales
from pouta.trainer.models.config import ModelConfig
from pouta.trainer.models.layers import MapSmoothing
from torch import nn

POOLS = (1, 3, 5, 9, 15, 21, 31, 41)


def _kernel(sigma: float) -> torch.Tensor:
    """The 1-D Gaussian the model's own ``MapSmoothing`` uses; [1.0] (no blur) at sigma 0."""
    return MapSmoothing(sigma).kernel_v.flatten() if sigma > 0 else torch.ones(1)


class AxisBlur(nn.Module):
    """MapSmoothing with one sigma per axis (0: that axis is not blurred)."""

    def __init__(self, sigma_rows: float, sigma_cols: float) -> None:
        super().__init__()
        self.kv = _kernel(sigma_rows).view(1, 1, -1, 1)
        self.kh = _kernel(sigma_cols).view(1, 1, 1, -1)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.kv, padding=(self.kv.shape[2] // 2, 0))
        return F.conv2d(x, self.kh, padding=(0, self.kh.shape[3] // 2))

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        return self._blur(amap) / self._blur(torch.ones_like(amap))


def main(checkpoint: str, data: str, out: Path, parts: list[str]) -> None:
    torch.set_num_threads(2)
    ck = read_checkpoint(checkpoint)
    cfg = ModelConfig.from_dict(ck["model_config"], source=f"{checkpoint}: model_config")
    pre = preprocessor_for_training(ck["train_config"], int(cfg.height), int(cfg.width))
    test = open_dataset(data, split="test")
    labels = np.array([r.label for r in test.records])

    def model_with(blur: nn.Module | None) -> nn.Module:
        model = build_model(cfg)
        model.load_state_dict(ck["model"])
        model.eval()
        if blur is not None:
            model.smoothing = blur
            model.cues.smoothing = blur
        return model

    def emit(row: dict[str, Any]) -> None:
        row = {"checkpoint": checkpoint, **row}
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if "pool" in parts:

        def frames() -> Any:
            for i in range(len(test.records)):
                img, _ = test.load(i, pre)
                yield img, pre.geometry_of_work(img.shape[1:])

        with torch.inference_mode():
            maps = [m for m, _ in score_frames(torch_scorer(model_with(None)), frames(), 8)]
        emit(
            {
                "probe": "pool",
                "map_hw": list(maps[0].shape),
                **{f"pool{k}": roc_auc(labels, np.array([pooled_max(m, k) for m in maps])) for k in POOLS},
            }
        )
    if "blur" in parts:
        train = open_dataset(data, split="train")
        picks = np.linspace(0, len(train.records) - 1, min(64, len(train.records))).astype(int)
        normal = torch.from_numpy(np.stack([train.load(int(i), pre)[0] for i in picks]))
        src_h, src_w = cv2.imread(str(test.records[0].path), cv2.IMREAD_UNCHANGED).shape[:2]
        # Source pixels per map pixel along rows and columns (whole-image models only).
        per_row, per_col = src_h / cfg.height, src_w / cfg.width
        on_part = (4.0, 4.0 * per_row / per_col) if per_col > per_row else (4.0 * per_col / per_row, 4.0)
        for name, (s_rows, s_cols) in {
            "sigma0": (0.0, 0.0),
            "sigma2": (2.0, 2.0),
            "sigma4": (4.0, 4.0),
            "sigma8": (8.0, 8.0),
            "sigma4_on_part": on_part,
        }.items():
            model = model_with(AxisBlur(s_rows, s_cols))
            fit_cue_scales(model, (normal[i : i + 16] for i in range(0, len(normal), 16)))
            with torch.inference_mode():
                rep = evaluate(torch_scorer(model), test, pre, progress=False)
            emit(
                {
                    "probe": "blur",
                    "blur": name,
                    "sigma_rows_cols": [round(s_rows, 3), round(s_cols, 3)],
                    **{k: rep[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")},
                }
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:] or ["pool", "blur"])
