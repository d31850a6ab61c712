"""Training-step time with the SSIM window as two 1-D passes (current) vs the 2-D depthwise window.

    python benchmarks/reports/quality-10min-cpu-2core/ssim_step_ab.py ../shared/data/mvtec_ad/bottle

Builds the category's default training set and model exactly as ``pouta-train`` does,
then alternates the two SSIM implementations step by step in one process (one batch,
channels_last, torch's default threads) and prints the median step time of each.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from pouta.trainer import losses
from pouta.trainer.models import build_model
from pouta.trainer.train import parser
from pouta.trainer.train_config import build_config, model_config_from
from pouta.trainer.training_set import (
    build_training_set,
    resolve_geometry,
    single_threaded_opencv,
    training_paths,
)


def ssim_2d(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The previous implementation: five depthwise convolutions with the 2-D window."""
    c = a.shape[1]
    win = losses.gaussian_window(size, sigma).to(a)[None, None].expand(c, 1, size, size).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, padding=size // 2, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def main(data: str, steps: int = 40) -> None:
    out = tempfile.mkdtemp(prefix="ssim_ab_")
    cfg = build_config(parser().parse_args(["--data", data, "--out", out]))
    single_threaded_opencv()
    paths = training_paths(cfg)
    resolve_geometry(cfg, paths)
    mcfg = model_config_from(cfg)
    dataset, _ = build_training_set(cfg, mcfg, paths)
    items = [dataset[i] for i in range(int(cfg["train"]["batch_size"]))]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "original", "mask")}
    torch.manual_seed(0)
    model = build_model(mcfg).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    separable = losses.ssim
    times: dict[str, list[float]] = {"separable": [], "2-D window": []}
    for k in range(steps):
        name = "2-D window" if k % 2 else "separable"
        losses.ssim = ssim_2d if k % 2 else separable
        t = time.perf_counter()
        o = model(image)
        parts = losses.total_loss(o.reconstruction, batch["original"], o.logits, batch["mask"], o.side_logits)
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        if k >= 4:
            times[name].append(time.perf_counter() - t)
    losses.ssim = separable
    med = {n: float(np.median(v)) * 1000 for n, v in times.items()}
    print(
        f"{data}: step median, separable {med['separable']:.0f} ms, 2-D window {med['2-D window']:.0f} ms "
        f"({len(times['separable'])} steps each, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main(sys.argv[1])
