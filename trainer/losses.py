"""POUTA training losses (paper eqs. 5-8) with DRAEM's conventions.

L_rec = MSE(I_r, I_ori) + (1 - SSIM(I_r, I_ori)), SSIM with an 11x11 Gaussian window,
sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 (inputs in [0, 1]), mean over pixels/channels.
L_seg(p, M) = focal(p, M) + L1(p[:, 1], M), focal on the 2-class softmax with alpha = 1,
gamma = 2: mean over pixels of -(1 - p_t)^gamma * log(p_t), p_t = prob of the true class.
L_pre = L_seg on the fused logits, L_MSS = sum_i lambda_i * L_seg(side_i),
lambda = (0.4, 0.3, 0.2, 0.1) for i = 1..4. L_total = L_rec + L_pre + L_MSS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MSS_LAMBDAS: tuple[float, float, float, float] = (0.4, 0.3, 0.2, 0.1)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (float32): one axis of the SSIM window."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian [size, size] (float32): the SSIM window."""
    g = gaussian_window_1d(size, sigma)
    return g[:, None] * g[None, :]


def ssim_kernels(
    channels: int, size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """The separable window of ``ssim_map`` for ``channels``-channel images:
    row kernel [5C,1,1,size] and column kernel [5C,1,size,1], one per local moment."""
    g = gaussian_window_1d(size, sigma)
    k = 5 * channels
    return g.view(1, 1, 1, size).repeat(k, 1, 1, 1), g.view(1, 1, size, 1).repeat(k, 1, 1, 1)


def ssim_map(
    a: torch.Tensor,
    b: torch.Tensor,
    size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    kernels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Local SSIM of [N,C,H,W] images in [0,1] -> [N,C,H,W] (Gaussian window, zero padding as DRAEM).

    The window is applied as a row pass then a column pass over five local moments stacked
    in one tensor: the same sums as the 2-D window (it is separable), with 2*size instead of
    size^2 taps and one filter call per pass; on CPU the 2-D depthwise window was a sizeable
    share of a training step. SSIM is written in the difference d = a - b, algebraically the
    usual formula: luminance 1 - mu_d^2 / (mu_a^2 + mu_b^2 + C1), contrast-structure
    1 - var_d / (var_a + var_b + C2) (var_a + var_b - 2 cov = var_d). The dissimilarity then
    comes from the small, well-conditioned moments of d, not from cancelling E[ab] against
    mu_a mu_b, which matters when the map runs in FP16 inside an exported graph.
    ``kernels``: ``ssim_kernels(C, size, sigma)`` made once (a model keeps them as buffers,
    so an exported graph gets fixed filters), else made here.
    """
    k_h, k_v = ssim_kernels(a.shape[1], size, sigma) if kernels is None else kernels
    k_h, k_v = k_h.to(a), k_v.to(a)
    d = a - b
    moments = torch.cat([a, b, a * a, b * b, d * d], dim=1)
    rows = F.conv2d(moments, k_h, padding=(0, k_h.shape[-1] // 2), groups=k_h.shape[0])
    local = F.conv2d(rows, k_v, padding=(k_v.shape[-2] // 2, 0), groups=k_v.shape[0])
    mu_a, mu_b, aa, bb, dd = local.chunk(5, dim=1)
    mu_d = mu_a - mu_b
    c1, c2 = 0.01**2, 0.03**2
    luminance = 1 - mu_d**2 / (mu_a**2 + mu_b**2 + c1)
    structure = 1 - (dd - mu_d**2) / (aa - mu_a**2 + bb - mu_b**2 + c2)
    return luminance * structure


def ssim(
    a: torch.Tensor, b: torch.Tensor, size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> torch.Tensor:
    """Mean SSIM of [N,C,H,W] images in [0,1]: ``ssim_map`` averaged over pixels and channels."""
    return ssim_map(a, b, size, sigma).mean()


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, 1 - SSIM) between reconstruction and the anomaly-free original."""
    return F.mse_loss(rec, target), 1.0 - ssim(rec, target)


def focal_loss(
    logits: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss on 2-class softmax probabilities. logits [N,2,H,W], mask [N,1,H,W] in {0,1}."""
    logp = torch.log_softmax(logits.float(), dim=1)
    target = mask.float()
    logp_t = logp[:, 1:2] * target + logp[:, 0:1] * (1.0 - target)
    p_t = logp_t.exp()
    return (-alpha * (1.0 - p_t) ** gamma * logp_t).mean()


def l1_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |p_anomaly - M| over pixels."""
    prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
    return (prob - mask.float()).abs().mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SS / L_pre = focal + L1."""
    return focal_loss(logits, mask) + l1_loss(logits, mask)


@dataclass
class LossParts:
    """Total and its parts (tensors; ``as_floats`` for logging)."""

    total: torch.Tensor
    mse: torch.Tensor
    ssim: torch.Tensor
    pre: torch.Tensor
    mss: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "mse", "ssim", "pre", "mss")}


def total_loss(
    reconstruction: torch.Tensor,
    original: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    side_logits: Sequence[torch.Tensor] = (),
    lambdas: Sequence[float] = MSS_LAMBDAS,
) -> LossParts:
    """L_total = L_rec + L_pre + L_MSS (L_MSS = 0 without side logits).

    reconstruction/original [N,3,H,W] in [0,1]; logits and side logits [N,2,H,W];
    mask [N,1,H,W] in {0,1}.
    """
    mse, ssim_l = reconstruction_loss(reconstruction.float(), original.float())
    pre = segmentation_loss(logits, mask)
    if side_logits:
        if len(side_logits) != len(lambdas):
            raise ValueError(f"side_logits: expected {len(lambdas)} MSS outputs, got {len(side_logits)}")
        mss = sum(lam * segmentation_loss(s, mask) for lam, s in zip(lambdas, side_logits, strict=True))
        mss = torch.as_tensor(mss, device=logits.device)
    else:
        mss = torch.zeros((), device=logits.device)
    return LossParts(total=mse + ssim_l + pre + mss, mse=mse, ssim=ssim_l, pre=pre, mss=mss)
