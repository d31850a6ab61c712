"""Reconstructive network: encoder F_E1..F_E4, mapping layer F_M, symmetric decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DoubleConv, UpBlock, encode_pyramid


@dataclass
class AEFeatures:
    """Autoencoder features, scale i at stride 2^(i-1).

    encoder: [F_E1..F_E4], F_Ei [N, widths[i-1], H/2^(i-1), W/2^(i-1)].
    decoder: [F_D1..F_D4], same shapes as the encoder feature of the same scale.
    reconstruction: [N,3,H,W] in [0,1], or None when not requested.
    """

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    reconstruction: torch.Tensor | None


class ReconstructiveAE(nn.Module):
    """DRAEM-style autoencoder without encoder-decoder skips.

    Skips would hand the anomalous input straight to the decoder and let defects be
    reconstructed; without them everything must pass the F_M bottleneck at H/16.

    x [N,3,H,W] -> F_E1 [N,w1,H,W] -> pool -> F_E2 [N,w2,H/2,W/2] -> ... -> F_E4 [N,w4,H/8,W/8]
    -> pool -> F_M [N,w4,H/16,W/16] -> F_D4 [N,w4,H/8] -> F_D3 [N,w3,H/4] -> F_D2 [N,w2,H/2]
    -> F_D1 [N,w1,H] -> conv3x3 + sigmoid -> I_r [N,3,H,W].
    """

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.enc = nn.ModuleList(
            [DoubleConv(3, w1), DoubleConv(w1, w2), DoubleConv(w2, w3), DoubleConv(w3, w4)]
        )
        self.mapping = DoubleConv(w4, w4)
        # dec[3] produces F_D4 from F_M, dec[0] produces F_D1 from F_D2.
        self.dec = nn.ModuleList([UpBlock(w2, w1), UpBlock(w3, w2), UpBlock(w4, w3), UpBlock(w4, w4)])
        self.image_head = nn.Conv2d(w1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, with_image: bool = True) -> AEFeatures:
        enc = encode_pyramid(self.enc, x)
        h = self.mapping(F.max_pool2d(enc[-1], 2))
        dec: list[torch.Tensor] = [h] * 4
        for i in (3, 2, 1, 0):
            h = self.dec[i](h, (enc[i].shape[-2], enc[i].shape[-1]))
            dec[i] = h
        rec = torch.sigmoid(self.image_head(h)) if with_image else None
        return AEFeatures(encoder=enc, decoder=dec, reconstruction=rec)
