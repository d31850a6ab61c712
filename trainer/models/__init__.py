"""Every model kind behind one contract: POUTA with its ablations and the vanilla
DRAEM-style baseline (trained from scratch), PRN, ReDi and the
pretrained-feature baseline (on a frozen ImageNet backbone).

>>> from pouta.trainer.models import build_model, preset_config
>>> model = build_model(preset_config("tiny", kind="pouta", variant="full"))
>>> out = model(images)  # images [N,3,H,W] in [0,1], H and W multiples of cfg.size_multiple
>>> out.anomaly_map.shape, out.score.shape  # [N,1,H,W], [N]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .autoencoder import AEFeatures, ReconstructiveAE
from .config import (
    BACKBONE_KINDS,
    MODEL_KINDS,
    MSS_HEADS,
    PRESETS,
    SIZE_MULTIPLE,
    VARIANTS,
    ModelConfig,
    Preset,
    check_input_size,
    preset_config,
)
from .features import FeatureKNN
from .layers import EQUAL_CUE_WEIGHTS, CueFusion, ModelOutput, fit_cue_scales, head_output, image_score
from .pouta import FCM, HSG, POUTA
from .prn import PRN
from .redi import ReDi
from .vanilla import UNetDiscriminator, VanillaDRAEM

__all__ = [
    "BACKBONE_KINDS",
    "EQUAL_CUE_WEIGHTS",
    "FCM",
    "HSG",
    "KINDS",
    "MODEL_KINDS",
    "MSS_HEADS",
    "POUTA",
    "PRESETS",
    "PRN",
    "SIZE_MULTIPLE",
    "VARIANTS",
    "AEFeatures",
    "CueFusion",
    "FeatureKNN",
    "KindSpec",
    "ModelConfig",
    "ModelOutput",
    "Preset",
    "ReDi",
    "ReconstructiveAE",
    "UNetDiscriminator",
    "VanillaDRAEM",
    "build_model",
    "check_input_size",
    "count_params",
    "fit_cue_scales",
    "head_output",
    "image_score",
    "preset_config",
]


@dataclass(frozen=True)
class KindSpec:
    """One model kind: how to build it and how it learns.

    ``build(cfg, pretrained)``: fresh module (``pretrained``: load the backbone's packaged
    weights; False when a checkpoint's weights follow). ``trains``: gradient training on
    synthetic anomalies (False: fitted on good parts only). ``summary``: one line for help.
    """

    build: Callable[[ModelConfig, bool], nn.Module]
    trains: bool
    summary: str


KINDS: dict[str, KindSpec] = {
    "pouta": KindSpec(lambda c, _: POUTA(c), True, "POUTA: autoencoder + light discriminator, from scratch"),
    "vanilla": KindSpec(lambda c, _: VanillaDRAEM(c), True, "DRAEM-style autoencoder + U-Net, from scratch"),
    "prn": KindSpec(PRN, True, "PRN: prototype residuals + multi-size attention on a pretrained backbone"),
    "features": KindSpec(FeatureKNN, False, "nearest normal patch in pretrained features, no training"),
    "redi": KindSpec(
        ReDi, True, "ReDi: recover from HOG + a similar good part, compare in pretrained features"
    ),
}
assert tuple(KINDS) == MODEL_KINDS


def build_model(cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    """The module a config describes (fresh weights; a backbone kind's trunk pretrained)."""
    cfg.validate()
    return KINDS[cfg.kind].build(cfg, pretrained)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
