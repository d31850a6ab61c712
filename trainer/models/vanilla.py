"""Vanilla DRAEM-style baseline: autoencoder + image-level U-Net discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import ReconstructiveAE
from .config import ModelConfig, check_input_size
from .layers import CueFusion, DoubleConv, ModelOutput, encode_pyramid, head_output, map_smoothings


class UNetDiscriminator(nn.Module):
    """U-Net on concat(input, reconstruction): [N,6,H,W] -> 2-class logits [N,2,H,W].

    Encoder widths b, 2b, 4b, 8b (H .. H/8), bottleneck 8b at H/16, decoder with skips.
    """

    def __init__(self, base: int) -> None:
        super().__init__()
        w = (base, 2 * base, 4 * base, 8 * base)
        self.enc = nn.ModuleList([DoubleConv(6, w[0]), DoubleConv(w[0], w[1]), DoubleConv(w[1], w[2])])
        self.enc.append(DoubleConv(w[2], w[3]))
        self.bottleneck = DoubleConv(w[3], w[3])
        # up[i]: upsample from scale i+1 (or bottleneck), reduce, concat skip i, DoubleConv.
        self.up = nn.ModuleList(
            [UpSkip(w[1], w[0]), UpSkip(w[2], w[1]), UpSkip(w[3], w[2]), UpSkip(w[3], w[3])]
        )
        self.out = nn.Conv2d(w[0], 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = encode_pyramid(self.enc, x)
        h = self.bottleneck(F.max_pool2d(skips[-1], 2))
        for i in (3, 2, 1, 0):
            h = self.up[i](h, skips[i])
        return self.out(h)


class UpSkip(nn.Module):
    """Upsample to the skip's size, ConvBNReLU to c_out, concat skip, DoubleConv(2*c_out -> c_out)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)
        self.block = DoubleConv(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        h = self.act(self.reduce(h))
        return self.block(torch.cat([h, skip], dim=1))


class VanillaDRAEM(nn.Module):
    """x [N,3,H,W] in [0,1] -> ``ModelOutput`` (side_logits always empty)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.smoothing, self.map_smoothing = map_smoothings(cfg)
        self.cues = CueFusion(
            cfg.cue_scales if cfg.reconstruction_cue else None, cfg.cue_error, cfg.cue_weights
        )
        self.ae = ReconstructiveAE(cfg.ae_widths)
        self.disc = UNetDiscriminator(cfg.unet_base)

    def forward(self, x: torch.Tensor, aux: bool = True) -> ModelOutput:
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), "vanilla input")
        rec = self.ae(x, with_image=True).reconstruction
        assert rec is not None
        logits = self.disc(torch.cat([x, rec], dim=1))
        amap, score = head_output(logits, self.smoothing, self.cues, x, rec, self.map_smoothing)
        return ModelOutput(amap, score, logits, rec, [])
