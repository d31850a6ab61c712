"""Probe: which reconstruction error makes the better second cue?

Same trained weights (a whole-image model with the reconstruction cue), evaluated like
``pouta-eval``. Each variant below is computed here from the model's input and
reconstruction (whatever ``model.cue_error`` the checkpoint has), blurred by the score's
smoothing, its scale ``k_r`` fitted as
``pouta-train`` fits it (mean pooled-max image score on the 64 normal training inputs) and
fused with the discriminator's map by the model's rule 0.5 (a / (a + k_a) + r / (r + k_r)).

- ``sq``: mean over channels of (x - x_r)^2 (the cue until 34a0543, ``cue_error: squared``)
- ``abs``: mean over channels of |x - x_r|
- ``ssim``: 1 - SSIM (11x11 Gaussian window, sigma 1.5, as the training loss), channel mean
  (written out here in the textbook form; the model's ``cue_error: ssim`` since 34a0543)
- ``gms``: multi-scale gradient magnitude dissimilarity (RIAD's MSGMS): 1 - GMS of the
  gray images at 1, 1/2, 1/4 and 1/8 size (Prewitt gradients, c = 170 / 255^2),
  upsampled back and averaged
- ``sq_gms``: the mean of the ``sq`` and ``gms`` cues each divided by its own scale, i.e. a
  third cue weighted like the other two
- ``sq_z`` / ``ssim_z``: another fusion rule, a z-score sum (a - m_a) / s_a + (r - m_r) / s_r
  with each cue's mean and spread of image scores on the normal inputs (unbounded, so not a
  map the contract allows as is; ``cue_fusion_probe.py`` measured it with the squared error)

Image AUROC of the fused map and of ``r`` alone; pixel AUROC (masks resized to the map as
``pouta-eval`` does) with the map blurred as the model returns it.

    python rec_error_probe.py RUN_DIR DATA OUT.jsonl        (repository root)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import open_dataset
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.losses import SSIM_SIGMA, SSIM_WINDOW, gaussian_window_1d
from pouta.trainer.metrics import roc_auc
from pouta.trainer.models.layers import discriminator_map
from pouta.trainer.train import CUE_FIT_INPUTS
from pouta.trainer.training_set import build_training_set, training_paths

sys.path.insert(0, str(Path(__file__).parent))
from cue_fusion_probe import append_row, pooled_max

GMS_C = 170.0 / 255.0**2
GMS_SCALES = (1, 2, 4, 8)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] x2 -> [N,1,H,W]: local SSIM, channel mean (the training loss's window)."""
    c = x.shape[1]
    g = gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA)
    pad = SSIM_WINDOW // 2
    m = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    k = m.shape[1]
    m = F.conv2d(m, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), padding=(0, pad), groups=k)
    m = F.conv2d(m, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), padding=(pad, 0), groups=k)
    mu_x, mu_y, xx, yy, xy = m.split(c, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * (xy - mu_x * mu_y) + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (xx - mu_x**2 + yy - mu_y**2 + c2)
    )
    return s.mean(dim=1, keepdim=True)


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """[N,1,H,W] -> [N,1,H,W]: Prewitt gradient magnitude (replicate padding)."""
    kx = torch.tensor([[1.0, 0.0, -1.0]] * 3) / 3.0
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return torch.sqrt(g.square().sum(dim=1, keepdim=True) + 1e-12)


def gms_dissimilarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] x2 -> [N,1,H,W]: mean over scales of 1 - GMS, at input size."""
    gx, gy = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    out = torch.zeros_like(gx)
    for s in GMS_SCALES:
        a = F.avg_pool2d(gx, s) if s > 1 else gx
        b = F.avg_pool2d(gy, s) if s > 1 else gy
        ma, mb = gradient_magnitude(a), gradient_magnitude(b)
        d = 1.0 - (2 * ma * mb + GMS_C) / (ma.square() + mb.square() + GMS_C)
        out = out + F.interpolate(d, size=gx.shape[-2:], mode="bilinear", align_corners=False)
    return out / len(GMS_SCALES)


ERRORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sq": lambda x, y: (x - y).square().mean(dim=1, keepdim=True),
    "abs": lambda x, y: (x - y).abs().mean(dim=1, keepdim=True),
    "ssim": lambda x, y: 1.0 - ssim_map(x, y),
    "gms": gms_dissimilarity,
}


@torch.inference_mode()
def cue_maps(
    model: torch.nn.Module, x: np.ndarray, smoothing: torch.nn.Module | None
) -> dict[str, np.ndarray]:
    """Inputs [N,3,H,W] -> {"a": discriminator map, error name: error map}, each [N,H,W]."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = model(t, aux=True)

    def blur(m: torch.Tensor) -> np.ndarray:
        return (m if smoothing is None else smoothing(m))[:, 0].numpy()

    maps = {"a": discriminator_map(out.logits, smoothing)[:, 0].numpy()}
    for name, err in ERRORS.items():
        maps[name] = blur(err(t, out.reconstruction))
    return maps


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
    normal = cue_maps(model, dataset.normal_inputs(CUE_FIT_INPUTS), model.smoothing)
    normal_scores = {name: pooled_max(m) for name, m in normal.items()}
    k = {name: float(v.mean()) for name, v in normal_scores.items()}
    spread = {name: float(v.std()) for name, v in normal_scores.items()}
    pixel_smoothing = model.map_smoothing or model.smoothing
    test = open_dataset(data, split="test")
    scored: dict[str, list[np.ndarray]] = {name: [] for name in normal}
    shown: dict[str, list[np.ndarray]] = {name: [] for name in normal}
    labels, masks = [], []
    for i, rec in enumerate(test.records):
        img, mask = test.load(i, pre)
        for maps, smoothing in ((scored, model.smoothing), (shown, pixel_smoothing)):
            for name, m in cue_maps(model, img[None], smoothing).items():
                maps[name].append(m[0])
        labels.append(rec.label)
        masks.append(mask)
    y = np.array(labels)

    def fused(maps: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        a = np.stack(maps["a"])
        sat = {name: (lambda m, kk: m / (m + kk))(np.stack(maps[name]), k[name]) for name in ERRORS}
        rules = {name: 0.5 * (a / (a + k["a"]) + sat[name]) for name in ERRORS}
        rules["sq_gms"] = a / (a + k["a"]) / 2 + 0.25 * (sat["sq"] + sat["gms"])
        for name in ("sq", "ssim"):
            r = np.stack(maps[name])
            rules[f"{name}_z"] = (a - k["a"]) / spread["a"] + (r - k[name]) / spread[name]
        rules.update({f"{name}_alone": np.stack(maps[name]) for name in ERRORS})
        return rules

    row: dict[str, object] = {
        "run": str(run),
        "steps": info.get("step"),
        "image_auroc": {name: round(roc_auc(y, pooled_max(v)), 4) for name, v in fused(scored).items()},
    }
    if all(m is not None for m, lab in zip(masks, labels, strict=True) if lab == 1):
        gt = np.concatenate(
            [
                np.zeros(scored["a"][0].shape, bool).ravel() if m is None else (np.asarray(m) > 0.5).ravel()
                for m in masks
            ]
        )
        row["pixel_auroc"] = {name: round(roc_auc(gt, v.ravel()), 4) for name, v in fused(shown).items()}
    append_row(out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
