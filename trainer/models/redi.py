"""ReDi: Recover-then-Discriminate (Xing, Zhang, Tang, Li; Sci. China Inf. Sci. 2025) on a
frozen pretrained trunk.

**Recover**: a small U-Net rebuilds the part as a good one from a prompt that does not
contain the input's detail (HIP): a self-generated structure map of the input (HOG, or
plain edges) and the most similar good part of a gallery, retrieved by cosine similarity of
the backbone's global descriptor. A defect's texture is never shown to the network, so it
cannot copy it through (the paper's "recovery shortcut").

**Discriminate**: the frozen backbone on the input X gives the reference features F_X
(s4, s8, s16); the same backbone on the recovered Y, followed by a trainable Feature
Recovery Block per scale, gives F_Y. Trained on good parts only with the recover loss,
L_D (1 - cosine of F_X and F_Y at every position) and L_S (the two branches' feature
self-correlation matrices agree); at inference the map is 1 - cosine per scale, upsampled
and averaged, blurred and scaled to [0,1] by the normal fit every pretrained kind uses.

Everything is inside ``forward``: the structure map, the retrieval (gallery images and
descriptors are buffers, so constants of the exported graph), the recovery and the
comparison, so an exported ReDi is one image in, ``anomaly_map`` + ``score`` out.
Choices where the paper is silent: ``docs/models.md`` (ReDi).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import reconstruction_loss
from .backbone import Backbone
from .config import ModelConfig, check_input_size
from .features import Tick, greedy_coreset, held_out_scale, scaled_distance
from .layers import DoubleConv, ModelOutput, encode_pyramid, image_score, map_smoothings, resize_to

REDI_TAPS = ("s4", "s8", "s16")  # the scales compared (s32 is mostly ImageNet semantics)
DESCRIPTOR_TAP = "s16"  # global descriptor for retrieval: pose and shape, not texture
HOG_CELL = 8  # pixels per HOG cell side (Dalal and Triggs)
HOG_POWER = 8  # sharpness of the soft orientation vote: cos^8 of the doubled angle
HOG_BLOCK_EPS = 1e-4  # block normalisation floor: flat regions stay flat, not amplified noise
# |g|^2 floor where a zero gradient's orientation is undefined; 1e-7 is also the smallest
# constant the FP16 converter keeps, so FP32 and FP16 files compute the same map
GRADIENT_EPS = 1e-7
SELF_MATCH = 0.9999  # cosine above which a gallery entry is the training input itself
GRAM_TAP_POOL = {"s4": 2}  # L_S at s4 is taken at s8 size: HW x HW stays affordable
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey
TRAIN_WINDOW_GRID = 32  # training windows start on the backbone's coarsest stride


class SobelGradients(nn.Module):
    """x [N,3,H,W] RGB in [0,1] -> (gx, gy) stacked [N,2,H,W] of the grey image.

    Sobel kernels divided by 8 (a unit step gives 0.5); no padding mode is needed: the
    gradient is computed on the interior and the 1-px border is zero (a fixed frame would
    otherwise vote the same edge into every image).
    """

    def __init__(self) -> None:
        super().__init__()
        sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        self.register_buffer("kernels", torch.stack([sx, sx.t()]).unsqueeze(1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = (x * self.luma).sum(1, keepdim=True)
        return F.pad(F.conv2d(grey, self.kernels), (1, 1, 1, 1))


class HOGMap(nn.Module):
    """Histogram of oriented gradients as a dense map. x [N,3,H,W] -> [N,bins,H,W] (>= 0).

    Unsigned orientation by the doubled-angle trick (cos 2t = (gx^2 - gy^2)/|g|^2,
    sin 2t = 2 gx gy/|g|^2: no atan2, which TensorRT lacks); each pixel votes its magnitude
    into bin k with weight relu(cos(2t - 2t_k))^p (t_k = k pi / bins), a dot product with
    fixed unit vectors; votes are averaged over ``HOG_CELL`` cells, L2-normalised over each
    3x3 block of cells and upsampled back to the input size.
    """

    def __init__(self, bins: int = 9, cell: int = HOG_CELL) -> None:
        super().__init__()
        self.channels, self.cell = bins, cell
        self.gradients = SobelGradients()
        angles = torch.arange(bins, dtype=torch.float32) * (2.0 * math.pi / bins)  # 2 t_k
        directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [bins,2]
        self.register_buffer("directions", directions.view(bins, 2, 1, 1), persistent=False)

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel soft orientation votes weighted by magnitude. [N,bins,H,W]."""
        g = self.gradients(x)
        gx, gy = g[:, :1], g[:, 1:]
        m2 = gx * gx + gy * gy + GRADIENT_EPS
        doubled = torch.cat([(gx * gx - gy * gy) / m2, 2.0 * gx * gy / m2], dim=1)
        return torch.pow(F.relu(F.conv2d(doubled, self.directions)), HOG_POWER) * torch.sqrt(m2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(self.votes(x), self.cell)
        energy = F.avg_pool2d(cells.square().sum(1, keepdim=True), 3, 1, 1, count_include_pad=False)
        return resize_to(cells / torch.sqrt(energy + HOG_BLOCK_EPS), x)


class EdgeMap(nn.Module):
    """Sobel gradient magnitude, the simplest self-generated map. x [N,3,H,W] -> [N,1,H,W]."""

    channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.gradients = SobelGradients()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.gradients(x).square().sum(1, keepdim=True) + GRADIENT_EPS)


def structure_map(kind: str, bins: int) -> HOGMap | EdgeMap:
    return HOGMap(bins) if kind == "hog" else EdgeMap()


def global_descriptor(f: torch.Tensor) -> torch.Tensor:
    """Global average pool, L2-normalised. [N,C,h,w] -> [N,C]."""
    return F.normalize(f.mean(dim=(2, 3)), dim=1)


class Gallery(nn.Module):
    """Good parts at model size and their descriptors, as buffers (graph constants).

    ``retrieve(q)``: q [N,C] unit descriptors -> (images [N,3,H,W], index [N]) of the
    highest cosine similarity; with ``exclude_self`` an entry that is the query itself
    (cosine above ``SELF_MATCH``) is passed over, so training never prompts with the answer.
    """

    def __init__(self, size: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.register_buffer("images", torch.zeros(size, 3, height, width))
        self.register_buffer("descriptors", torch.zeros(size, channels))

    def fill(self, images: torch.Tensor, descriptors: torch.Tensor) -> None:
        if images.shape != self.images.shape or descriptors.shape != self.descriptors.shape:
            raise ValueError(
                f"gallery: expected {tuple(self.images.shape)} and {tuple(self.descriptors.shape)}, "
                f"got {tuple(images.shape)} and {tuple(descriptors.shape)}"
            )
        self.images.copy_(images)
        self.descriptors.copy_(descriptors)

    def similarity(self, q: torch.Tensor) -> torch.Tensor:
        return q @ self.descriptors.t()  # [N,G]

    def retrieve(self, q: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        sims = self.similarity(q)
        if exclude_self:
            sims = sims.masked_fill(sims > SELF_MATCH, -2.0)
        index = sims.argmax(dim=1)
        return self.images.index_select(0, index), index


def gallery_pick(descriptors: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` diverse images: greedy farthest-point over unit descriptors [M,C]
    (``features.greedy_coreset``); repeated in order when there are fewer images."""
    idx = greedy_coreset(descriptors, size, seed)
    return idx.repeat(math.ceil(size / len(idx)))[:size]


class RecoverNet(nn.Module):
    """U-Net from the HIP prompt to the recovered image. [N,c_in,H,W] -> Y [N,3,H,W] in [0,1].

    Widths (w/2, w, 2w, 4w) at H, H/2, H/4, H/8: the full-resolution level is the costly
    one on a CPU and needs few channels to place edges.
    """

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        widths = (max(width // 2, 4), width, 2 * width, 4 * width)
        ins = (c_in, *widths[:-1])
        self.down = nn.ModuleList([DoubleConv(a, b) for a, b in zip(ins, widths, strict=True)])
        self.up = nn.ModuleList([DoubleConv(widths[i + 1] + widths[i], widths[i]) for i in range(3)])
        self.out = nn.Conv2d(widths[0], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = encode_pyramid(self.down, x)
        h = feats[-1]
        for i in reversed(range(len(feats) - 1)):
            h = self.up[i](torch.cat([resize_to(h, feats[i]), feats[i]], dim=1))
        return torch.sigmoid(self.out(h))


class FeatureRecoveryBlock(nn.Module):
    """Residual 1x1 -> 3x3 -> 1x1 conv block. R_Y [N,C,h,w] -> F_Y [N,C,h,w].

    No BatchNorm (training batches are a handful of images); the last conv starts at zero so
    F_Y = R_Y at the start and L_D first shapes the recovery, then the block.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = max(channels // 2, 8)
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return r + self.body(r)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine over channels, per position. [N,C,h,w] x2 -> [N,1,h,w] in [0,2]."""
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6).unsqueeze(1)


def self_correlation(f: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every position with every other. [N,C,h,w] -> [N,hw,hw]."""
    z = F.normalize(f.flatten(2), dim=1)  # [N,C,hw]
    return z.transpose(1, 2) @ z


@dataclass(frozen=True)
class Window:
    """A rectangle of an input: rows top..top+height, columns left..left+width."""

    top: int
    left: int
    height: int
    width: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., self.top : self.top + self.height, self.left : self.left + self.width]


def train_window(x: torch.Tensor, side: int) -> Window | None:
    """A random ``side`` x ``side`` window of x [N,C,H,W] (clipped to its size) at a corner on
    the ``TRAIN_WINDOW_GRID``, so the backbone's and the HOG cells' grids stay those of the
    whole input; None when ``side`` is 0 or covers the input. Drawn from torch's generator
    (seeded and restored on resume by the trainer)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if side <= 0 or (side >= h and side >= w):
        return None
    sh, sw = min(side, h), min(side, w)
    top = int(torch.randint((h - sh) // TRAIN_WINDOW_GRID + 1, ())) * TRAIN_WINDOW_GRID
    left = int(torch.randint((w - sw) // TRAIN_WINDOW_GRID + 1, ())) * TRAIN_WINDOW_GRID
    return Window(top, left, sh, sw)


class ReDiLoss:
    """Total and parts (``as_floats`` for the training log)."""

    def __init__(self, total: torch.Tensor, **parts: torch.Tensor) -> None:
        self.total, self.parts = total, parts

    def as_floats(self) -> dict[str, float]:
        return {"total": float(self.total.detach()), **{k: float(v.detach()) for k, v in self.parts.items()}}


class ReDi(nn.Module):
    """ReDi. x [N,3,H,W] in [0,1] (H, W multiples of 32) -> ``ModelOutput``.

    anomaly_map [N,1,H,W] = d / (d + k), d the blurred mean over scales of 1 - cos(F_X, F_Y),
    k = ``distance_scale`` (1 before the fit); score [N] its 21x21 pooled max;
    reconstruction Y [N,3,H,W] when ``aux``.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone, REDI_TAPS, cfg.backbone_weights, pretrained)
        stage = {s.name: s for s in self.backbone.stages}
        self.smoothing, self.map_smoothing = map_smoothings(cfg)
        self.structure = structure_map(cfg.redi_structure, cfg.redi_hog_bins)
        self.gallery = Gallery(cfg.redi_gallery, stage[DESCRIPTOR_TAP].channels, cfg.height, cfg.width)
        c_in = self.structure.channels + 3 if cfg.redi_hip else 3
        self.recover = RecoverNet(c_in, cfg.redi_width)
        self.frb = (
            nn.ModuleDict({t: FeatureRecoveryBlock(stage[t].channels) for t in REDI_TAPS})
            if cfg.redi_frb
            else None
        )

    def recover_input(self, x: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
        """What the recover network sees: [structure map, retrieved good part] (HIP), or the
        raw image with HIP off. [N,c_in,H,W]."""
        if not self.cfg.redi_hip:
            return x
        prompt, _ = self.gallery.retrieve(descriptor, exclude_self=self.training)
        return torch.cat([self.structure(x), prompt], dim=1)

    def branches(
        self, x: torch.Tensor, window: Window | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """(F_X per tap, Y, F_Y per tap). The reference branch takes no gradient; L_D and L_S
        reach the recover network through the frozen backbone on Y. With a ``window``
        (training) the retrieval and the structure map are computed on the whole input and
        only that window of x and of the prompt is recovered and compared."""
        with torch.no_grad():
            f_x = self.backbone(x)
        prompt = self.recover_input(x, global_descriptor(f_x[DESCRIPTOR_TAP]))
        if window is not None:
            x, prompt = window.of(x), window.of(prompt)
            with torch.no_grad():
                f_x = self.backbone(x)
        y = self.recover(prompt)
        r_y = self.backbone(y)
        f_y = {t: self.frb[t](r_y[t]) for t in REDI_TAPS} if self.frb is not None else r_y
        return f_x, y, f_y

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Raw map at input size [N,1,H,W] (not blurred, not scaled)."""
        return self._distance(x)[0]

    def _distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_x, y, f_y = self.branches(x)
        maps = [resize_to(cosine_distance(f_x[t], f_y[t]), x) for t in REDI_TAPS]
        return torch.stack(maps, dim=0).mean(dim=0), y

    def forward(self, x: torch.Tensor, aux: bool = True) -> ModelOutput:
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), "ReDi input", self.cfg.size_multiple)
        d, y = self._distance(x)
        k = self.cfg.distance_scale or 1.0
        scored = scaled_distance(d, self.smoothing, k)
        amap = scored if self.map_smoothing is None else scaled_distance(d, self.map_smoothing, k)
        return ModelOutput(amap, image_score(scored), reconstruction=y if aux else None)

    # -- training hooks (``trainer.train``) -------------------------------------------
    def training_loss(self, image: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> ReDiLoss:
        """Recover (MSE + 1 - SSIM) + L_D + L_S on good parts: the anomaly-free ``original``
        (the synthetic ``image`` and ``mask`` are not used; ReDi never sees a defect)."""
        window = train_window(original, self.cfg.redi_train_crop)
        f_x, y, f_y = self.branches(original, window)
        target = original if window is None else window.of(original)
        mse, dssim = reconstruction_loss(y, target)
        l_d = torch.stack([cosine_distance(f_x[t], f_y[t]).mean() for t in REDI_TAPS]).mean()
        total = mse + dssim + l_d
        parts = {"mse": mse, "ssim": dssim, "l_d": l_d}
        if self.cfg.redi_self_correlation:
            l_s = torch.stack([self._gram_gap(f_x[t], f_y[t], t) for t in REDI_TAPS]).mean()
            total = total + l_s
            parts["l_s"] = l_s
        return ReDiLoss(total, **parts)

    @staticmethod
    def _gram_gap(f_x: torch.Tensor, f_y: torch.Tensor, tap: str) -> torch.Tensor:
        pool = GRAM_TAP_POOL.get(tap, 1)
        if pool > 1:
            f_x, f_y = F.avg_pool2d(f_x, pool), F.avg_pool2d(f_y, pool)
        return F.mse_loss(self_correlation(f_y), self_correlation(f_x))

    @torch.no_grad()
    def fit_before_training(
        self, batches: Sequence[torch.Tensor], seed: int, tick: Tick | None = None
    ) -> str:
        """Choose the gallery from normal inputs: farthest-point over their descriptors.
        Returns what was fitted, for the training log."""
        self.eval()
        images, descs = [], []
        for x in batches:
            if tick is not None:
                tick()
            images.append(x.cpu())
            descs.append(global_descriptor(self.backbone(x)[DESCRIPTOR_TAP]).cpu())
        if not images:
            raise ValueError("gallery: no normal inputs")
        all_images, all_descs = torch.cat(images), torch.cat(descs)
        pick = gallery_pick(all_descs, self.cfg.redi_gallery, seed)
        self.gallery.fill(all_images[pick].contiguous(), all_descs[pick].contiguous())
        return f"a gallery of {len(pick)} good parts"

    @torch.no_grad()
    def fit_after_training(self, batches: Sequence[torch.Tensor]) -> str:
        """k from held-out normal inputs that never entered the gallery: their mean image
        score of the raw map, so a typical good part scores about 0.5. Returns it as a line
        for the training log."""
        self.eval()
        self.cfg = self.cfg.with_(distance_scale=None)
        k = held_out_scale(self.distance, self.smoothing, batches)
        self.cfg = self.cfg.with_(distance_scale=k)
        return f"distance scale {k:.4g}"
