"""POUTA: a light discriminative network on the autoencoder's symmetric features."""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import ReconstructiveAE
from .config import ModelConfig, check_input_size
from .layers import ConvBNReLU, CueFusion, ModelOutput, head_output, map_smoothings, resize_to


class FCM(nn.Module):
    """Feature contrast module: concat(F_Ei, F_Di) -> ConvBNReLU 3x3 -> F_Ci.

    [N,c_ae,h,w] x2 -> [N,c_disc,h,w].
    """

    def __init__(self, c_ae: int, c_disc: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(2 * c_ae, c_disc)

    def forward(self, f_e: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([f_e, f_d], dim=1))


class HSG(nn.Module):
    """High-level semantic guidance for scale i from F'_C(i+1).

    f_sp: upsample + conv3x3 -> 1 channel + sigmoid -> W_sp [N,1,h,w].
    f_cn: upsample + conv3x3 -> c_i channels + global average pool + sigmoid -> W_cn [N,c_i,1,1].
    F'_Ci = W_sp * F_Ci * W_cn. Inputs: F_Ci [N,c_i,h,w], F'_C(i+1) [N,c_i+1,h/2,w/2].
    """

    def __init__(self, c_high: int, c_low: int) -> None:
        super().__init__()
        self.f_sp = nn.Conv2d(c_high, 1, 3, padding=1)
        self.f_cn = nn.Conv2d(c_high, c_low, 3, padding=1)

    def forward(self, f_c: torch.Tensor, f_high: torch.Tensor) -> torch.Tensor:
        up = resize_to(f_high, f_c)
        w_sp = torch.sigmoid(self.f_sp(up))
        w_cn = torch.sigmoid(self.f_cn(up).mean(dim=(2, 3), keepdim=True))
        return w_sp * f_c * w_cn


class POUTA(nn.Module):
    """POUTA (variants: base = FCM + fusion, hsg, mss, full = both).

    x [N,3,H,W] in [0,1] -> ``ModelOutput`` (anomaly_map [N,1,H,W] (``CueFusion``), score [N], logits
    [N,2,H,W], reconstruction [N,3,H,W], side_logits 4 x [N,2,H,W] when MSS is on).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.smoothing, self.map_smoothing = map_smoothings(cfg)
        self.cues = CueFusion(
            cfg.cue_scales if cfg.reconstruction_cue else None, cfg.cue_error, cfg.cue_weights
        )
        ae_w, d_w = cfg.ae_widths, cfg.disc_widths
        self.ae = ReconstructiveAE(ae_w)
        self.fcm = nn.ModuleList([FCM(a, d) for a, d in zip(ae_w, d_w, strict=True)])
        # hsg[i] guides scale i+1 (0-based i = 0..2) from scale i+2.
        self.hsg = nn.ModuleList([HSG(d_w[i + 1], d_w[i]) for i in range(3)]) if cfg.hsg else None
        if cfg.mss:
            k = 1 if cfg.mss_head == "conv1x1" else 3
            self.mss_heads: nn.ModuleList | None = nn.ModuleList(
                [nn.Conv2d(c, 2, k, padding=k // 2) for c in d_w]
            )
        else:
            self.mss_heads = None
        self.fusion = nn.Sequential(
            ConvBNReLU(sum(d_w), cfg.fusion_width), nn.Conv2d(cfg.fusion_width, 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, aux: bool = True) -> ModelOutput:
        """``aux=False`` skips the training-only outputs (image head, MSS heads): the export path."""
        check_input_size(int(x.shape[-2]), int(x.shape[-1]), "POUTA input")
        feats = self.ae(x, with_image=aux or self.cues.scales is not None)
        f_c = [m(e, d) for m, e, d in zip(self.fcm, feats.encoder, feats.decoder, strict=True)]
        if self.hsg is not None:
            for i in (2, 1, 0):
                f_c[i] = self.hsg[i](f_c[i], f_c[i + 1])
        side: list[torch.Tensor] = []
        if aux and self.mss_heads is not None:
            side = [resize_to(head(f), x) for head, f in zip(self.mss_heads, f_c, strict=True)]
        common = f_c[self.cfg.fusion_scale - 1]
        fused = torch.cat([resize_to(f, common) for f in f_c], dim=1)
        logits = resize_to(self.fusion(fused), x)
        amap, score = head_output(
            logits, self.smoothing, self.cues, x, feats.reconstruction, self.map_smoothing
        )
        return ModelOutput(amap, score, logits, feats.reconstruction, side)
