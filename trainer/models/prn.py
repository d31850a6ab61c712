"""PRN: Prototypical Residual Network (Zhang et al., CVPR 2023) on a frozen pretrained trunk.

Frozen backbone features at three scales (s4, s8, s16) are compared with **prototypes** of
normal features; the **residual** to the nearest prototype and the feature itself feed a
**multi-size self-attention** block per scale; a U-Net-like decoder fuses the scales (from
s32 up) into 2-class logits at full resolution, trained on synthetic (and optionally a few
real) anomalies with SmoothL1 + focal loss.

Choices where the paper (and the unofficial code) are silent or do not suit a line:
- Prototypes are **patch** prototypes (a coreset of normal patch features per scale), not
  whole feature maps: parts on a line are not pixel-aligned, and a patch prototype gives a
  residual wherever the part sits.
- One attention block per scale, at s8 and s16 only (the paper's code: three per scale,
  s4 too): a training step must stay affordable within minutes on a CPU.
- The map a line sees fuses the learned map with the nearest-neighbour distance of the
  s8+s16 patch features (the ``features`` kind's cue), each normalised and weighted by how
  steady it is on held-out good parts (``layers.fit_two_cues``), so PRN ranks parts at
  least as a memory of normal patches does while its head learns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .config import ModelConfig, check_input_size
from .features import FEATURE_TAPS, PatchMemory, Tick, aggregate_taps, memory_rows, pool_patch
from .layers import (
    ConvBNReLU,
    ModelOutput,
    discriminator_map,
    fit_two_cues,
    fuse_cues,
    image_score,
    map_smoothings,
    resize_to,
    scaled_cue,
)

PRN_TAPS = ("s4", "s8", "s16", "s32")
PROTOTYPE_TAPS = ("s4", "s8", "s16")  # s32 only feeds the decoder (as the paper's layer 4)
WINDOW_SPLITS = (1, 2, 4, 8)  # windows of the full map, its halves, quarters, eighths
ATTENTION_BLOCKS = 1  # the paper's code has 3; one keeps a CPU training step affordable
ATTENTION_TAPS = ("s8", "s16")  # at s4 the residual goes straight to the decoder (cost)
PROTOTYPE_SHARE = 4  # prototypes per scale = memory_size / this
# The learned head's share of the fused map (the patch distance gets the rest), chosen on
# the validation split by ``pouta-bench --sections cue-weights``: a fixed share, because the
# head's steadiness on a few held-out good parts says little about how well it ranks defects.
HEAD_WEIGHT = 0.75


class WindowAttention(nn.Module):
    """Self-attention among the k x k windows of a map, a token being one flattened window.

    [N,C,h,w] -> [N,C,h,w]; Q, K, V are depthwise 1x1 convolutions. k = 1 is one token
    (the whole map, attention is V).
    """

    def __init__(self, channels: int, split: int) -> None:
        super().__init__()
        self.split = split
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, groups=channels)

    def _tokens(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        k = self.split
        c = t.shape[1]
        t = t.reshape(-1, c, k, h // k, k, w // k).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(-1, k * k, c * (h // k) * (w // k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        qkv = self.qkv(x).reshape(-1, c, 3, h, w)
        q, k_, v = (self._tokens(qkv[:, :, i], h, w) for i in range(3))
        attn = torch.softmax(q @ k_.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out = attn @ v  # [N,k*k,D]
        k = self.split
        out = out.reshape(-1, k, k, c, h // k, w // k).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(-1, c, h, w)


class MultiSizeAttention(nn.Module):
    """Window attention at every split that divides the map, concatenated, 1x1 fused,
    added back. [N,C,h,w] -> [N,C,h,w]."""

    def __init__(self, channels: int, h: int, w: int) -> None:
        super().__init__()
        splits = [k for k in WINDOW_SPLITS if h % k == 0 and w % k == 0]
        self.branches = nn.ModuleList([WindowAttention(channels, k) for k in splits])
        self.fuse = ConvBNReLU(channels * len(splits), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(torch.cat([b(x) for b in self.branches], dim=1))


class ResidualScale(nn.Module):
    """One scale: feature f [N,C,h,w] and its squared residual to the nearest prototype ->
    [N,width,h,w] through ``ATTENTION_BLOCKS`` multi-size attention blocks (none when
    ``attend`` is off)."""

    def __init__(
        self, channels: int, prototypes: int, width: int, h: int, w: int, attend: bool = True
    ) -> None:
        super().__init__()
        self.prototypes = PatchMemory(max(prototypes, 1), channels)
        self.reduce = ConvBNReLU(2 * channels, width, 1)
        blocks = [MultiSizeAttention(width, h, w) for _ in range(ATTENTION_BLOCKS)] if attend else []
        self.blocks = nn.Sequential(*blocks)

    def residual(self, f: torch.Tensor) -> torch.Tensor:
        _, idx = self.prototypes.nearest(f)  # [N,P]
        nearest = self.prototypes.memory[idx]  # [N,P,C]
        nearest = nearest.transpose(1, 2).reshape(f.shape)
        return (f - nearest).square()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.reduce(torch.cat([f, self.residual(f)], dim=1)))


class PRN(nn.Module):
    """PRN. x [N,3,H,W] in [0,1] (H, W multiples of 32) -> ``ModelOutput``.

    logits [N,2,H,W] (the learned head); anomaly_map [N,1,H,W] in [0,1]: the head's
    probability fused with the patch-memory distance once ``cue_scales`` are fitted (before,
    the head's probability alone); score [N] the 21x21 pooled max.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone, PRN_TAPS, cfg.backbone_weights, pretrained)
        self.smoothing, self.map_smoothing = map_smoothings(cfg)
        stage = {s.name: s for s in self.backbone.stages}
        w = cfg.prn_width
        self.scales = nn.ModuleDict(
            {
                t: ResidualScale(
                    stage[t].channels,
                    cfg.prototypes,
                    w,
                    cfg.height // stage[t].stride,
                    cfg.width // stage[t].stride,
                    attend=t in ATTENTION_TAPS,
                )
                for t in PROTOTYPE_TAPS
            }
        )
        self.top = ConvBNReLU(stage["s32"].channels, w, 1)
        self.up = nn.ModuleDict({t: ConvBNReLU(2 * w, w) for t in PROTOTYPE_TAPS})
        self.head = nn.Conv2d(w, 2, 1)
        # The patch-memory cue; ``FEATURE_TAPS`` are a subset of ``PRN_TAPS``, so it reuses
        # the trunk's output rather than running a second backbone.
        self.cue_memory = PatchMemory(cfg.memory_size, sum(stage[t].channels for t in FEATURE_TAPS))

    def logits(self, taps: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        h = self.top(taps["s32"])
        for t in ("s16", "s8", "s4"):
            f = self.scales[t](pool_patch(taps[t]))
            h = self.up[t](torch.cat([resize_to(h, f), f], dim=1))
        return resize_to(self.head(h), like)

    def cue_distance(self, taps: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return resize_to(self.cue_memory(cue_features(taps)), like)

    def forward(self, x: torch.Tensor, aux: bool = True) -> ModelOutput:
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), "PRN input", self.cfg.size_multiple)
        taps = self.backbone(x)
        logits = self.logits(taps, x)
        if self.cfg.cue_scales is None:
            scored = discriminator_map(logits, self.smoothing)
            amap = scored if self.map_smoothing is None else discriminator_map(logits, self.map_smoothing)
            return ModelOutput(amap, image_score(scored), logits)
        d = self.cue_distance(taps, x)
        scored = self._fused(logits, d, self.smoothing)
        amap = scored if self.map_smoothing is None else self._fused(logits, d, self.map_smoothing)
        return ModelOutput(amap, image_score(scored), logits)

    def _fused(self, logits: torch.Tensor, d: torch.Tensor, smoothing: nn.Module | None) -> torch.Tensor:
        a = discriminator_map(logits, smoothing)
        r = d if smoothing is None else smoothing(d)
        return fuse_cues(a, r, self.cfg.cue_scales, self.cfg.cue_weights)  # type: ignore[arg-type]

    @torch.no_grad()
    def cue_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head, distance) [N,1,H,W] in [0,1), each scaled by its fitted normal level and
        blurred as the image score sees them: the fused map is their ``cue_weights`` sum."""
        if self.cfg.cue_scales is None:
            raise ValueError("cue_maps: the cue scales are not fitted (fit_cues)")
        taps = self.backbone(x)
        a = discriminator_map(self.logits(taps, x), self.smoothing)
        d = self.cue_distance(taps, x)
        r = d if self.smoothing is None else self.smoothing(d)
        k_a, k_r = self.cfg.cue_scales
        return scaled_cue(a, k_a), scaled_cue(r, k_r)

    @torch.no_grad()
    def fit_prototypes(self, batches: Sequence[torch.Tensor], seed: int, tick: Tick | None = None) -> None:
        """Prototypes per scale and the cue memory from normal inputs (before training)."""
        self.eval()
        rows = max(1, self.cfg.memory_size // PROTOTYPE_SHARE)
        taps_seen: dict[str, list[torch.Tensor]] = {t: [] for t in PROTOTYPE_TAPS}
        cue_rows: list[torch.Tensor] = []
        for x in batches:
            if tick is not None:
                tick()
            taps = self.backbone(x)
            for t in PROTOTYPE_TAPS:
                f = pool_patch(taps[t])
                taps_seen[t].append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
            f = cue_features(taps)
            cue_rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        for i, t in enumerate(PROTOTYPE_TAPS):
            scale = self.scales[t]
            scale.prototypes = PatchMemory(rows, scale.prototypes.memory.shape[1])
            scale.prototypes.fill(memory_rows(torch.cat(taps_seen[t]), rows, seed + i, tick))
        self.cue_memory.fill(memory_rows(torch.cat(cue_rows), self.cfg.memory_size, seed, tick))
        self.cfg = self.cfg.with_(prototypes=rows)

    def fit_before_training(
        self, batches: Sequence[torch.Tensor], seed: int, tick: Tick | None = None
    ) -> str:
        """Training's hook: the prototypes and the cue memory. Returns a line for the log."""
        self.fit_prototypes(batches, seed, tick)
        return f"{self.cfg.prototypes} prototypes per scale and a memory of {self.cfg.memory_size} patch features"

    def training_loss(self, image: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> PRNLoss:
        """Training's hook: the paper's loss on the head's logits (``original`` unused)."""
        return prn_loss(self(image).logits, mask)

    def fit_after_training(self, batches: Sequence[torch.Tensor]) -> str:
        """Training's hook: the cues' scales on held-out normal inputs. Returns a log line."""
        (k_a, k_d), (w_a, w_d) = self.fit_cues(batches)
        return (
            f"learned map scale {k_a:.4g} weight {w_a:.2f}, patch distance scale {k_d:.4g} weight {w_d:.2f}"
        )

    @torch.no_grad()
    def fit_cues(self, batches: Sequence[torch.Tensor]) -> tuple[tuple[float, float], tuple[float, float]]:
        """The two cues' scales from held-out normal inputs (after training); their weights
        are ``HEAD_WEIGHT``'s split."""
        self.eval()
        a_scores, d_scores = [], []
        for x in batches:
            taps = self.backbone(x)
            a_scores.append(image_score(discriminator_map(self.logits(taps, x), self.smoothing)))
            d = self.cue_distance(taps, x)
            d_scores.append(image_score(d if self.smoothing is None else self.smoothing(d)))
        if not a_scores:
            raise ValueError("fit_cues: no normal inputs")
        scales, _ = fit_two_cues(torch.cat(a_scores), torch.cat(d_scores))
        weights = (HEAD_WEIGHT, 1.0 - HEAD_WEIGHT)
        self.cfg = self.cfg.with_(cue_scales=scales, cue_weights=weights)
        return scales, weights


def cue_features(taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``features`` kind's patch features from taps already computed. -> [N,C,h,w]."""
    return aggregate_taps([taps[t] for t in FEATURE_TAPS])


def prn_loss(logits: torch.Tensor, mask: torch.Tensor) -> PRNLoss:
    """SmoothL1 on the anomaly probability + 5 x focal (alpha 0.5, gamma 4), as the paper's code.

    logits [N,2,H,W], mask [N,1,H,W] in {0,1}.
    """
    from ..losses import focal_loss

    prob = torch.softmax(logits.float(), dim=1)[:, 1:2]
    smooth = F.smooth_l1_loss(prob, mask.float())
    focal = focal_loss(logits, mask, alpha=0.5, gamma=4.0)
    return PRNLoss(smooth + 5.0 * focal, smooth, focal)


class PRNLoss:
    """Total and parts (``as_floats`` for the training log)."""

    def __init__(self, total: torch.Tensor, smooth_l1: torch.Tensor, focal: torch.Tensor) -> None:
        self.total, self.smooth_l1, self.focal = total, smooth_l1, focal

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "smooth_l1", "focal")}
