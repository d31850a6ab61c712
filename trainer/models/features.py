"""The pretrained-feature baseline (``--kind features``): nearest-neighbour distance of each
patch's backbone features to a memory of normal patch features, PatchCore-style.

No gradient training: a line can be commissioned from a few dozen good parts in minutes.
Everything that scores a part is in the graph (backbone, aggregation, memory as a
constant, the distance, the normalisation), so the export runs torch-free like every kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .config import ModelConfig, check_input_size
from .layers import ModelOutput, image_score, map_smoothings, resize_to, scaled_cue

Tick = Callable[[], None]
FEATURE_TAPS = ("s8", "s16")  # mid-level: local texture and shape, not ImageNet classes
CORESET_PROJECTION = 64  # dimensions the coreset selection measures distances in
CORESET_CANDIDATES = 100_000  # patch features a coreset is chosen from (random subset above)


def pool_patch(f: torch.Tensor) -> torch.Tensor:
    """3x3 average of a feature map (a patch sees its neighbours). [N,C,h,w] -> [N,C,h,w]."""
    return F.avg_pool2d(f, 3, 1, 1, count_include_pad=False)


def aggregate_taps(taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several taps, each ``pool_patch``-ed, brought to the first one's
    resolution and concatenated. -> [N, sum C, h, w]."""
    pooled = [pool_patch(f) for f in taps]
    return torch.cat([resize_to(f, pooled[0]) for f in pooled], dim=1)


class PatchFeatures(nn.Module):
    """Backbone taps through ``aggregate_taps``. x [N,3,H,W] -> [N,C,H/s,W/s]."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.channels = sum(s.channels for s in backbone.stages)
        self.stride = min(s.stride for s in backbone.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aggregate_taps(list(self.backbone(x).values()))


class PatchMemory(nn.Module):
    """Euclidean distance of each query feature to its nearest row of a fixed memory.

    f [N,C,h,w] -> [N,1,h,w] >= 0. ``memory`` [M,C] is a persistent buffer (checkpoints
    and the exported graph carry it); ``fill`` sets it from normal features.
    """

    def __init__(self, rows: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("memory", torch.zeros(rows, channels))
        self.register_buffer("memory_sq", torch.zeros(rows))

    def fill(self, rows: torch.Tensor) -> None:
        if tuple(rows.shape) != tuple(self.memory.shape):
            raise ValueError(f"memory: expected {tuple(self.memory.shape)}, got {tuple(rows.shape)}")
        self.memory.copy_(rows)
        self.memory_sq.copy_(rows.square().sum(1))

    def nearest(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distance [N,h*w], index [N,h*w]) of each query's nearest memory row."""
        q = f.flatten(2).transpose(1, 2)  # [N,P,C]
        d2 = q.square().sum(-1, keepdim=True) - 2.0 * (q @ self.memory.t()) + self.memory_sq
        return d2.min(dim=-1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        d2, _ = self.nearest(f)
        d = d2.clamp_min(0.0).sqrt()
        return d.reshape(f.shape[0], 1, f.shape[2], f.shape[3])


def greedy_coreset(feats: torch.Tensor, rows: int, seed: int = 0, tick: Tick | None = None) -> torch.Tensor:
    """Indices of ``rows`` features of ``feats`` [P,C] that cover them (greedy k-center,
    PatchCore's coreset): each pick is the feature farthest from all picked so far, measured
    in a fixed random projection. All indices when ``rows`` >= P. ``tick`` is called now
    and then (a long selection is not a stall)."""
    p = feats.shape[0]
    if rows >= p:
        return torch.arange(p)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(feats.shape[1], CORESET_PROJECTION, generator=gen) / CORESET_PROJECTION**0.5
    z = feats @ proj
    z_sq = z.square().sum(1)
    picked = torch.empty(rows, dtype=torch.long)
    picked[0] = int(torch.randint(p, (1,), generator=gen))
    dist = torch.full((p,), float("inf"))
    threads = torch.get_num_threads()
    # Thousands of small steps: one thread, since waking a pool per step costs more than
    # the step (and much more on a busy machine).
    torch.set_num_threads(1)
    try:
        for i in range(rows):
            if i:
                picked[i] = int(dist.argmax())
            c = z[picked[i]]
            dist = torch.minimum(dist, z_sq - 2.0 * (z @ c) + c.square().sum())
            if tick is not None and i % 256 == 0:
                tick()
    finally:
        torch.set_num_threads(threads)
    return picked


def collect_features(
    extract: nn.Module, batches: Iterable[torch.Tensor], tick: Tick | None = None
) -> torch.Tensor:
    """Patch features of normal inputs, one row per patch: [sum N*h*w, C]."""
    rows = []
    with torch.no_grad():
        for x in batches:
            if tick is not None:
                tick()
            f = extract(x)
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    if not rows:
        raise ValueError("no normal inputs")
    return torch.cat(rows)


def memory_rows(feats: torch.Tensor, rows: int, seed: int, tick: Tick | None = None) -> torch.Tensor:
    """A ``rows`` x C memory that covers ``feats``: a coreset of a random subset of them
    (duplicates fill a memory larger than the features, so buffer shapes stay fixed)."""
    gen = torch.Generator().manual_seed(seed)
    if feats.shape[0] > CORESET_CANDIDATES:
        feats = feats[torch.randperm(feats.shape[0], generator=gen)[:CORESET_CANDIDATES]]
    idx = greedy_coreset(feats, rows, seed, tick)
    if len(idx) < rows:
        idx = torch.cat([idx, idx[torch.randint(len(idx), (rows - len(idx),), generator=gen)]])
    return feats[idx].contiguous()


class FeatureKNN(nn.Module):
    """Pretrained patch features -> distance to the nearest normal patch -> map in [0,1].

    x [N,3,H,W] in [0,1] -> ``ModelOutput`` (anomaly_map [N,1,H,W] = d / (d + k) of the
    upsampled, blurred distance d, k = ``distance_scale``; score [N] its 21x21 pooled max).
    Before ``fit`` the memory is zeros and k is 1.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = PatchFeatures(Backbone(cfg.backbone, FEATURE_TAPS, cfg.backbone_weights, pretrained))
        self.memory = PatchMemory(cfg.memory_size, self.features.channels)
        self.smoothing, self.map_smoothing = map_smoothings(cfg)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised distance map at input size [N,1,H,W] (not blurred)."""
        return resize_to(self.memory(self.features(x)), x)

    def forward(self, x: torch.Tensor, aux: bool = True) -> ModelOutput:
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), "features input", self.cfg.size_multiple)
        d = self.distance(x)
        k = self.cfg.distance_scale or 1.0
        scored = scaled_distance(d, self.smoothing, k)
        amap = scored if self.map_smoothing is None else scaled_distance(d, self.map_smoothing, k)
        return ModelOutput(amap, image_score(scored))

    @torch.no_grad()
    def fit(
        self,
        fit_batches: Sequence[torch.Tensor],
        scale_batches: Sequence[torch.Tensor],
        seed: int,
        tick: Tick | None = None,
    ) -> int:
        """Fill the memory from ``fit_batches`` and fit k on ``scale_batches`` (normal inputs
        the memory has not seen): k = their mean image score of the raw distance, so a
        typical good part scores about 0.5. Returns how many patch features were seen."""
        self.eval()
        feats = collect_features(self.features, fit_batches, tick)
        self.memory.fill(memory_rows(feats, self.cfg.memory_size, seed, tick))
        self.cfg = self.cfg.with_(distance_scale=None)
        k = held_out_scale(self.distance, self.smoothing, scale_batches)
        self.cfg = self.cfg.with_(distance_scale=k)
        return int(feats.shape[0])


def scaled_distance(d: torch.Tensor, smoothing: nn.Module | None, k: float) -> torch.Tensor:
    """A raw distance map [N,1,H,W] -> blurred, d / (d + k) in [0,1) (k: its normal level)."""
    return scaled_cue(d if smoothing is None else smoothing(d), k)


@torch.no_grad()
def held_out_scale(distance, smoothing: nn.Module | None, batches: Sequence[torch.Tensor]) -> float:
    """Mean image score (blurred, 21x21 pooled max) of a raw distance map over ``batches``."""
    scores = [image_score(d if smoothing is None else smoothing(d)) for d in map(distance, batches)]
    if not scores:
        raise ValueError("no held-out normal inputs")
    return max(float(torch.cat(scores).mean()), 1e-6)
