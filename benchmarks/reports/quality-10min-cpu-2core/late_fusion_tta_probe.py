"""Probe: three scoring variants on the same weights, against the model's own image score.

Same trained weights (a whole-image model with the reconstruction cue), evaluated like
``pouta-eval``; the cue maps come from ``cue_fusion_probe.cue_maps`` and the cue scales
``k_a, k_r`` are fitted as ``pouta-train`` fits them (mean pooled-max image score of each
cue on its 64 normal training inputs), unless said otherwise.

- ``mean_sat``: the model's rule, 0.5 (a / (a + k_a) + r / (r + k_r)) pixel by pixel, then
  the contract's pooled max (what ``pouta-eval`` reports)
- ``late_sat``: each cue's own pooled max first, then fused: 0.5 (S(a) / (S(a) + k_a) +
  S(r) / (S(r) + k_r)); the cues may peak in different places
- ``k_test_good``: the model's rule with k fitted on the category's test/good images, i.e.
  on normal parts the model never trained on (an oracle: a line would need a held-out set)
- ``hflip_map`` / ``hvflip_map``: test-time augmentation, the fused maps of the image and
  of its horizontal (and vertical) mirror image, mirrored back and averaged, then pooled
- ``hflip_score``: the mean of the image's and its mirror image's scores

    python late_fusion_tta_probe.py RUN_DIR DATA OUT.jsonl        (repository root)
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

# Mirror axes of an [N,3,H,W] input; its maps are [N,H,W], one axis fewer.
MIRRORS = {"none": None, "horizontal": 3, "vertical": 2}


def fused(a: np.ndarray, r: np.ndarray, k_a: float, k_r: float) -> np.ndarray:
    return 0.5 * (a / (a + k_a) + r / (r + k_r))


def mirrored_maps(model: torch.nn.Module, x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Cue maps of ``x`` mirrored along ``axis``, mirrored back into ``x``'s frame."""
    if axis is None:
        return cue_maps(model, x)
    a, r = cue_maps(model, np.flip(x, axis=axis).copy())
    return np.flip(a, axis=axis - 1), np.flip(r, axis=axis - 1)


def main(argv: list[str]) -> int:
    run, data, out = Path(argv[0]), argv[1], argv[2]
    torch.set_num_threads(2)
    model, cfg, info = load_model(run / "model.pt")
    model.eval()
    train_cfg = info["train_config"]
    pre = preprocessor_for_training(train_cfg, int(cfg.height), int(cfg.width))
    dataset, _ = build_training_set(train_cfg, cfg, training_paths(train_cfg))
    a_n, r_n = cue_maps(model, dataset.normal_inputs(CUE_FIT_INPUTS))
    k_a, k_r = float(pooled_max(a_n).mean()), float(pooled_max(r_n).mean())
    test = open_dataset(data, split="test")
    maps: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {m: ([], []) for m in MIRRORS}
    labels = []
    for i, rec in enumerate(test.records):
        img, _ = test.load(i, pre)
        for name, axis in MIRRORS.items():
            a, r = mirrored_maps(model, img[None], axis)
            maps[name][0].append(a[0])
            maps[name][1].append(r[0])
        labels.append(rec.label)
    y = np.array(labels)
    a_t, r_t = (np.stack(v) for v in maps["none"])
    a_h, r_h = (np.stack(v) for v in maps["horizontal"])
    a_v, r_v = (np.stack(v) for v in maps["vertical"])
    s_a, s_r = pooled_max(a_t), pooled_max(r_t)
    good = y == 0
    base = fused(a_t, r_t, k_a, k_r)
    mirror_h = fused(a_h, r_h, k_a, k_r)
    model_score = pooled_max(base)
    scores = {
        "mean_sat": model_score,
        "late_sat": 0.5 * (s_a / (s_a + k_a) + s_r / (s_r + k_r)),
        "k_test_good": pooled_max(fused(a_t, r_t, float(s_a[good].mean()), float(s_r[good].mean()))),
        "hflip_map": pooled_max(0.5 * (base + mirror_h)),
        "hvflip_map": pooled_max((base + mirror_h + fused(a_v, r_v, k_a, k_r)) / 3.0),
        "hflip_score": 0.5 * (model_score + pooled_max(mirror_h)),
    }
    row = {
        "run": str(run),
        "steps": info.get("step"),
        "image_auroc": {k: round(roc_auc(y, v), 4) for k, v in scores.items()},
    }
    append_row(out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
