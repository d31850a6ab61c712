"""Probe: is the reconstruction cue's fusion rule the one that ranks best?

Same trained weights (a whole-image model with the cue), evaluated like ``pouta-eval``: the
discriminator's map ``a`` and the reconstruction error ``r``, both blurred as the image
score sees them, on every test image and on the 64 normal training inputs ``pouta-train``
fits the cue scales on (``dataset.normal_inputs``). Each rule below fuses the two maps
pixel by pixel; the image score is the contract's pooled max of the fused map. ``k_a, k_r``
are the cues' mean image scores on those normal inputs (the model's own ``cue_scales``),
``q_a, q_r`` their 95th percentiles, ``m, s`` their means and standard deviations.

- ``disc``: a alone (no cue);  ``rec``: r alone
- ``mean_sat`` (the model's rule): 0.5 (a / (a + k_a) + r / (r + k_r))
- ``max_sat``: max(a / (a + k_a), r / (r + k_r))
- ``sum``: a / k_a + r / k_r;  ``geo``: sqrt(a r / (k_a k_r))
- ``mean_sat_q95``: the model's rule with q_a, q_r instead of the means
- ``z``: (a - m_a) / s_a + (r - m_r) / s_r

Pixel AUROC (masks resized to the map, as ``pouta-eval`` does) where the category has masks
and the map is blurred as the score's (``model.map_sigma_hw`` unset).

    python cue_fusion_probe.py RUN_DIR DATA OUT.jsonl        (repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import open_dataset
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.metrics import roc_auc
from pouta.trainer.models.layers import discriminator_map, image_score
from pouta.trainer.train import CUE_FIT_INPUTS
from pouta.trainer.training_set import build_training_set, training_paths


def pooled_max(maps: np.ndarray) -> np.ndarray:
    """[N,H,W] -> [N]: the contract's image score of each map (the model's ``image_score``)."""
    return image_score(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]).numpy()


def append_row(out: str | Path, row: dict[str, object]) -> None:
    """Print one result row and append it to the JSON-lines file ``out``."""
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@torch.inference_mode()
def cue_maps(model: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [N,3,H,W] -> (discriminator map, reconstruction error), each [N,H,W], score-blurred."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = model(t, aux=True)
    a = discriminator_map(out.logits, model.smoothing)
    r = model.cues.reconstruction_error(t, out.reconstruction, model.smoothing)
    return a[:, 0].numpy(), r[:, 0].numpy()


def main(argv: list[str]) -> int:
    run, data, out = Path(argv[0]), argv[1], argv[2]
    torch.set_num_threads(2)
    model, cfg, info = load_model(run / "model.pt")
    model.eval()
    if cfg.cue_scales is None:
        raise SystemExit(f"{run}/model.pt: no reconstruction cue")
    train_cfg = info["train_config"]
    pre = preprocessor_for_training(train_cfg, int(cfg.height), int(cfg.width))
    dataset, _ = build_training_set(train_cfg, cfg, training_paths(train_cfg))
    a_n, r_n = cue_maps(model, dataset.normal_inputs(CUE_FIT_INPUTS))
    test = open_dataset(data, split="test")
    a_t, r_t, labels, masks = [], [], [], []
    for i, rec in enumerate(test.records):
        img, mask = test.load(i, pre)
        a, r = cue_maps(model, img[None])
        a_t.append(a[0])
        r_t.append(r[0])
        labels.append(rec.label)
        masks.append(mask)
    a_t, r_t = np.stack(a_t), np.stack(r_t)
    sa, sr = pooled_max(a_n), pooled_max(r_n)
    k_a, k_r = float(sa.mean()), float(sr.mean())
    q_a, q_r = np.quantile(sa, 0.95), np.quantile(sr, 0.95)
    rules = {
        "disc": a_t,
        "rec": r_t,
        "mean_sat": 0.5 * (a_t / (a_t + k_a) + r_t / (r_t + k_r)),
        "max_sat": np.maximum(a_t / (a_t + k_a), r_t / (r_t + k_r)),
        "sum": a_t / k_a + r_t / k_r,
        "geo": np.sqrt(a_t * r_t / (k_a * k_r)),
        "mean_sat_q95": 0.5 * (a_t / (a_t + q_a) + r_t / (r_t + q_r)),
        "z": (a_t - sa.mean()) / sa.std() + (r_t - sr.mean()) / sr.std(),
    }
    y = np.array(labels)
    row: dict[str, object] = {
        "run": str(run),
        "steps": info.get("step"),
        "cue_scales_model": list(cfg.cue_scales),
        "cue_scales_probe": [k_a, k_r],
        "image_auroc": {k: round(roc_auc(y, pooled_max(v)), 4) for k, v in rules.items()},
    }
    have_masks = all(m is not None for m, lab in zip(masks, labels, strict=True) if lab == 1)
    if have_masks and cfg.map_sigma_hw is None:
        gt = np.concatenate(
            [
                np.zeros(a_t.shape[1:], bool).ravel() if m is None else (np.asarray(m) > 0.5).ravel()
                for m in masks
            ]
        )
        row["pixel_auroc"] = {k: round(roc_auc(gt, v.ravel()), 4) for k, v in rules.items()}
    append_row(out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
