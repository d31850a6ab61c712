"""Building blocks shared by the autoencoder and both discriminators."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pouta.edge.contract.metadata import SCORE_POOL_SIZE
from torch import nn

from ..losses import ssim_kernels, ssim_map

EQUAL_CUE_WEIGHTS = (0.5, 0.5)  # cue fusion of a model fitted before ``cue_weights`` existed
# Neither cue is ever silenced: a cue can look steady on good parts only because it has not
# learned anything yet (an untrained discriminator is flat everywhere).
MIN_CUE_WEIGHT = 0.1

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns.

    anomaly_map: [N,1,H,W] in [0,1]: softmax channel 1 of ``logits``, Gaussian-smoothed by
        ``MapSmoothing`` when the config's ``map_sigma`` > 0.
    score: [N], max of the 21x21 stride-1 average-pooled map (count_include_pad, as DRAEM).
    logits: [N,2,H,W] final 2-class logits (normal, anomalous) at input size; None for a
        model that learns none (``features``).
    reconstruction: [N,3,H,W] in [0,1]; None when ``aux=False`` and the model does not need it.
    side_logits: MSS logits [N,2,H,W] at input size for scales 1..4; empty when MSS is off
        or ``aux=False``.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    logits: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    side_logits: list[torch.Tensor] = field(default_factory=list)


def image_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """[N,1,H,W] -> [N]: max of the 21x21 (stride 1, zero padded) average-pooled map."""
    # Separable (21x1 then 1x21) box filter: with zero padding counted, it equals the
    # 21x21 average pool exactly (up to float rounding) at a tenth of the CPU cost.
    k, pad = SCORE_POOL_SIZE, SCORE_POOL_SIZE // 2
    pooled = F.avg_pool2d(anomaly_map, (k, 1), stride=1, padding=(pad, 0), count_include_pad=True)
    pooled = F.avg_pool2d(pooled, (1, k), stride=1, padding=(0, pad), count_include_pad=True)
    return pooled.amax(dim=(1, 2, 3))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of ``sigma`` pixels, radius 3 sigma (at least 1), sum 1; [1.0] at sigma 0."""
    if sigma <= 0:
        return torch.ones(1)
    radius = max(1, round(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class MapSmoothing(nn.Module):
    """Fixed (not trained) Gaussian blur of an anomaly map. [N,1,H,W] -> [N,1,H,W].

    ``sigma``: one value (round in input pixels) or (rows, columns), input pixels; an axis
    at 0 is not blurred. The discriminator's map is sharp at a defect's border and can dip
    inside large defects; a blur of a few pixels fills those dips and raises pixel AUROC on
    real data (README, model choices). It lives inside ``forward`` so the exported ONNX, the
    evaluation and the runtime all see the same map. Separable, zero padded and renormalised
    by the blurred ones-image, so the image border is neither darkened nor needs a padding
    mode TensorRT may lack.
    """

    def __init__(self, sigma: float | tuple[float, float]) -> None:
        super().__init__()
        rows, cols = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
        self.sigma = (float(rows), float(cols))
        k_v, k_h = gaussian_kernel(self.sigma[0]), gaussian_kernel(self.sigma[1])
        self.radius = (len(k_v) // 2, len(k_h) // 2)
        # Not persistent: rebuilt from the config, so checkpoints carry no extra tensors.
        self.register_buffer("kernel_v", k_v.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("kernel_h", k_h.view(1, 1, 1, -1), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        if self.radius[0]:
            x = F.conv2d(x, self.kernel_v.to(x.dtype), padding=(self.radius[0], 0))
        if self.radius[1]:
            x = F.conv2d(x, self.kernel_h.to(x.dtype), padding=(0, self.radius[1]))
        return x

    def forward(self, amap: torch.Tensor) -> torch.Tensor:
        return self._blur(amap) / self._blur(torch.ones_like(amap))


def map_smoothings(cfg: ModelConfig) -> tuple[MapSmoothing | None, MapSmoothing | None]:
    """(score's blur, map's own blur or None when it is the score's) from a model config.

    The image score is pooled from the map blurred round in input pixels (``map_sigma``);
    ``map_sigma_hw``, when set, blurs the map that is returned (and shown, thresholded,
    measured) per axis instead: round on the part for an input that squashes it.
    """
    score = MapSmoothing(cfg.map_sigma) if cfg.map_sigma > 0 else None
    hw = cfg.map_sigma_hw
    if hw is None or tuple(hw) == (cfg.map_sigma, cfg.map_sigma):
        return score, None
    return score, MapSmoothing(hw)


def discriminator_map(logits: torch.Tensor, smoothing: nn.Module | None = None) -> torch.Tensor:
    """2-class logits [N,2,H,W] -> anomaly probability [N,1,H,W] (smoothed when asked)."""
    amap = torch.softmax(logits, dim=1)[:, 1:2]
    return amap if smoothing is None else smoothing(amap)


def head_output(
    logits: torch.Tensor,
    smoothing: nn.Module | None,
    cues: CueFusion,
    x: torch.Tensor,
    rec: torch.Tensor | None,
    map_smoothing: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-class logits [N,2,H,W] (+ input and reconstruction for the second cue) ->
    (anomaly map [N,1,H,W] in [0,1], image score [N]).

    The score is the pooled max of the fused map blurred by ``smoothing``; with
    ``map_smoothing`` the map returned is the same fusion blurred by it instead
    (``map_smoothings``)."""
    scored = cues(discriminator_map(logits, smoothing), x, rec, smoothing)
    if map_smoothing is None:
        return scored, image_score(scored)
    amap = cues(discriminator_map(logits, map_smoothing), x, rec, map_smoothing)
    return amap, image_score(scored)


class CueFusion(nn.Module):
    """One anomaly map from two cues: the discriminator's map and the reconstruction error.

    a [N,1,H,W] (discriminator probability, smoothed) and x, x_r [N,3,H,W] (input and
    reconstruction) -> [N,1,H,W] in [0,1]: w_a * a / (a + k_a) + w_r * r / (r + k_r), with r
    the reconstruction error (``error``: ``ssim`` = 1 - local SSIM, the autoencoder's own
    training measure; ``squared`` = squared error), channel mean, blurred by the same
    ``smoothing`` as a. k_a, k_r (``cue_scales``) are each cue's mean image score on normal
    training inputs, so both count in units of what a good part shows; the weights
    (``cue_weights``, w_a + w_r = 1, equal halves when None) say how steady each cue is on
    those parts (``fit_cue_scales``). The map stays in [0,1] for pixel thresholds. Without
    scales (a model being trained) the map is ``a``.
    """

    def __init__(
        self,
        scales: tuple[float, float] | None,
        error: str = "ssim",
        weights: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.scales = scales
        self.weights = weights
        self.error = error
        # Fixed filters of a fixed shape (inputs are RGB), so the exported graph has constant
        # convolution weights; not persistent: checkpoints carry no extra tensors.
        k_h, k_v = ssim_kernels(3)
        self.register_buffer("ssim_rows", k_h, persistent=False)
        self.register_buffer("ssim_cols", k_v, persistent=False)

    def reconstruction_error(
        self, x: torch.Tensor, rec: torch.Tensor, smoothing: nn.Module | None
    ) -> torch.Tensor:
        """[N,3,H,W] x2 -> [N,1,H,W] >= 0: the ``error`` measure, channel mean, blurred by ``smoothing``."""
        if self.error == "ssim":
            # Rounding can put SSIM a hair above 1; the cue must stay >= 0 for r / (r + k_r).
            ssim = ssim_map(x, rec, kernels=(self.ssim_rows, self.ssim_cols))
            err = (1.0 - ssim.mean(dim=1, keepdim=True)).clamp_min(0.0)
        else:
            err = (x - rec).square().mean(dim=1, keepdim=True)
        return err if smoothing is None else smoothing(err)

    def forward(
        self, amap: torch.Tensor, x: torch.Tensor, rec: torch.Tensor | None, smoothing: nn.Module | None
    ) -> torch.Tensor:
        if self.scales is None or rec is None:
            return amap
        return fuse_cues(amap, self.reconstruction_error(x, rec, smoothing), self.scales, self.weights)


def fuse_cues(
    a: torch.Tensor, r: torch.Tensor, scales: tuple[float, float], weights: tuple[float, float] | None
) -> torch.Tensor:
    """Two non-negative cue maps [N,1,H,W] -> w_a * a / (a + k_a) + w_r * r / (r + k_r) in [0,1]."""
    (k_a, k_r), (w_a, w_r) = scales, weights or EQUAL_CUE_WEIGHTS
    return w_a * scaled_cue(a, k_a) + w_r * scaled_cue(r, k_r)


def scaled_cue(m: torch.Tensor, k: float) -> torch.Tensor:
    """A non-negative cue map -> m / (m + k) in [0,1): 0.5 where it equals its normal level k."""
    return m / (m + k)


def fit_two_cues(
    a_scores: torch.Tensor, r_scores: torch.Tensor
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scales, weights) of two cues from their image scores [n] on normal inputs: each scale
    the cue's mean, the weights by ``cue_weights``."""
    floor = 1e-6  # a cue that is flat on every good input must not divide by zero
    scores = (a_scores.float(), r_scores.float())
    scales = (max(float(scores[0].mean()), floor), max(float(scores[1].mean()), floor))
    spreads = tuple(float(s.std()) if len(s) > 1 else 0.0 for s in scores)
    return scales, cue_weights(scales, spreads)  # type: ignore[arg-type]


@torch.no_grad()
def fit_cue_scales(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[float, float]:
    """Fit the cue fusion on normal inputs (batches [N,3,H,W]); returns ``cue_scales``.

    Each cue's image scores (blurred as the image score sees them, before any fusion) give
    its scale k (their mean) and its weight, proportional to k / s (s their standard
    deviation): a cue whose good parts all score alike says more when a part scores high
    than one whose good parts already scatter. Sets both on ``model`` (its ``cues`` and
    ``cfg``); the model is put in eval mode.
    """
    cues: CueFusion = model.cues  # type: ignore[assignment]
    cues.scales = None
    model.eval()
    disc, rec = [], []
    for x in batches:
        out = model(x, aux=True)
        disc.append(out.score.float())
        err = cues.reconstruction_error(x, out.reconstruction, model.smoothing)  # type: ignore[arg-type]
        rec.append(image_score(err.float()))
    if not disc:
        raise ValueError("fit_cue_scales: no normal inputs")
    scales, weights = fit_two_cues(torch.cat(disc), torch.cat(rec))
    cues.scales, cues.weights = scales, weights
    model.cfg = model.cfg.with_(cue_scales=scales, cue_weights=weights)  # type: ignore[operator]
    return scales


def cue_weights(scales: tuple[float, float], spreads: tuple[float, float]) -> tuple[float, float]:
    """Each cue's share of the fused map: proportional to its scale over its spread on good
    parts (the inverse of the coefficient of variation), each share kept within
    [``MIN_CUE_WEIGHT``, 1 - ``MIN_CUE_WEIGHT``]; equal halves when a spread is unknown or
    nil (one normal input, or a cue flat on all of them)."""
    if min(spreads) <= 1e-9 * max(scales):
        return EQUAL_CUE_WEIGHTS
    snr = (scales[0] / spreads[0], scales[1] / spreads[1])
    w_a = min(max(snr[0] / (snr[0] + snr[1]), MIN_CUE_WEIGHT), 1.0 - MIN_CUE_WEIGHT)
    return (w_a, 1.0 - w_a)


def resize_to(x: torch.Tensor, like: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``like`` (a no-op when equal)."""
    size = tuple(like.shape[-2:]) if isinstance(like, torch.Tensor) else tuple(like)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv kxk (no bias) + BatchNorm + ReLU; spatial size kept. [N,Cin,H,W] -> [N,Cout,H,W]."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ConvBNReLU 3x3 (DRAEM's block). [N,Cin,H,W] -> [N,Cout,H,W]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(ConvBNReLU(c_in, c_out), ConvBNReLU(c_out, c_out))


class UpBlock(nn.Module):
    """Bilinear x2 to ``size`` + ConvBNReLU + DoubleConv. [N,Cin,h,w] -> [N,Cout,H,W]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.reduce = ConvBNReLU(c_in, c_out)
        self.block = DoubleConv(c_out, c_out)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.block(self.reduce(resize_to(x, size)))


def encode_pyramid(blocks: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``blocks`` with a 2x max-pool between them: features at H, H/2, H/4, ... (one per block)."""
    feats: list[torch.Tensor] = []
    h = x
    for i, block in enumerate(blocks):
        if i > 0:
            h = F.max_pool2d(h, 2)
        h = block(h)
        feats.append(h)
    return feats
