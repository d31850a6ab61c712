"""Losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from pouta.trainer.losses import (
    MSS_LAMBDAS,
    focal_loss,
    gaussian_window,
    l1_loss,
    segmentation_loss,
    ssim,
    total_loss,
)


def _logits_for(p1: list[float]) -> torch.Tensor:
    """2-class logits whose softmax channel 1 equals ``p1`` (1x2 image)."""
    p = torch.tensor(p1)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).reshape(1, 2, 1, len(p1))


def test_focal_and_l1_by_hand() -> None:
    logits = _logits_for([0.8, 0.3])
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    # pixel 1: true class anomalous, p_t = 0.8; pixel 2: true class normal, p_t = 0.7
    focal = (-(0.2**2) * math.log(0.8) - (0.3**2) * math.log(0.7)) / 2
    l1 = (0.2 + 0.3) / 2
    assert focal_loss(logits, mask).item() == pytest.approx(focal, rel=1e-5)
    assert l1_loss(logits, mask).item() == pytest.approx(l1, rel=1e-5)
    assert segmentation_loss(logits, mask).item() == pytest.approx(focal + l1, rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy() -> None:
    logits = torch.randn(2, 2, 3, 3)
    mask = (torch.rand(2, 1, 3, 3) > 0.5).float()
    ce = torch.nn.functional.cross_entropy(logits, mask[:, 0].long())
    assert focal_loss(logits, mask, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-5)


def test_ssim_window_and_values() -> None:
    g = gaussian_window()
    assert g.shape == (11, 11) and g.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert g[5, 5] == g.max() and g[5, 4].item() == pytest.approx(g[5, 6].item())
    # centre/neighbour ratio exp(-1 / (2 * 1.5^2))
    assert (g[5, 4] / g[5, 5]).item() == pytest.approx(math.exp(-1 / 4.5), rel=1e-5)
    a = torch.rand(1, 3, 16, 16)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    # constant images c and d with a 1x1 window: SSIM = (2cd + C1) / (c^2 + d^2 + C1), variances 0
    c, d = 0.2, 0.6
    c1 = 0.01**2
    expected = (2 * c * d + c1) / (c * c + d * d + c1)
    x, y = torch.full((1, 1, 5, 5), c), torch.full((1, 1, 5, 5), d)
    assert ssim(x, y, size=1, sigma=1.5).item() == pytest.approx(expected, rel=1e-5)


def test_ssim_separable_window_equals_the_2d_window() -> None:
    """Row-then-column filtering must give DRAEM's 2-D windowed SSIM (zero padding), and its gradient."""

    def ssim_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = a.shape[1]
        win = gaussian_window()[None, None].expand(c, 1, 11, 11)

        def filt(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(t, win, padding=5, groups=c)

        mu_a, mu_b = filt(a), filt(b)
        var_a, var_b, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
        return (num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean()

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 20, 37, generator=g).requires_grad_()
    b = (a.detach() + 0.2 * torch.rand(2, 3, 20, 37, generator=g)).clamp(0, 1)
    fast, ref = ssim(a, b), ssim_2d(a, b)
    assert fast.item() == pytest.approx(ref.item(), abs=1e-6) and fast.item() < 0.99
    (g_fast,) = torch.autograd.grad(fast, a)
    (g_ref,) = torch.autograd.grad(ref, a)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)
    cl = a.detach().contiguous(memory_format=torch.channels_last)
    assert ssim(cl, b).item() == pytest.approx(ref.item(), abs=1e-6)


def test_total_loss_sums_parts() -> None:
    torch.manual_seed(0)
    rec, orig = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    logits = torch.randn(2, 2, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.7).float()
    sides = [torch.randn(2, 2, 8, 8) for _ in range(4)]
    parts = total_loss(rec, orig, logits, mask, sides)
    mse = ((rec - orig) ** 2).mean().item()
    mss = sum(lam * segmentation_loss(s, mask).item() for lam, s in zip(MSS_LAMBDAS, sides, strict=True))
    assert MSS_LAMBDAS == (0.4, 0.3, 0.2, 0.1)
    assert parts.mse.item() == pytest.approx(mse, rel=1e-5)
    assert parts.ssim.item() == pytest.approx(1 - ssim(rec, orig).item(), rel=1e-5)
    assert parts.pre.item() == pytest.approx(segmentation_loss(logits, mask).item(), rel=1e-5)
    assert parts.mss.item() == pytest.approx(mss, rel=1e-5)
    assert parts.total.item() == pytest.approx(mse + parts.ssim.item() + parts.pre.item() + mss, rel=1e-5)
    no_mss = total_loss(rec, orig, logits, mask)
    assert no_mss.mss.item() == 0.0
    with pytest.raises(ValueError, match="MSS"):
        total_loss(rec, orig, logits, mask, sides[:2])
