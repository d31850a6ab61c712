"""POUTA, its ablations and the vanilla DRAEM-style baseline.

>>> from pouta.trainer.models import build_model, preset_config
>>> model = build_model(preset_config("tiny", kind="pouta", variant="full"))
>>> out = model(images)  # images [N,3,H,W] in [0,1], H and W multiples of 16
>>> out.anomaly_map.shape, out.score.shape  # [N,1,H,W], [N]
"""

from __future__ import annotations

from torch import nn

from .autoencoder import AEFeatures, ReconstructiveAE
from .config import (
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
from .layers import EQUAL_CUE_WEIGHTS, CueFusion, ModelOutput, fit_cue_scales, head_output, image_score
from .pouta import FCM, HSG, POUTA
from .vanilla import UNetDiscriminator, VanillaDRAEM

__all__ = [
    "EQUAL_CUE_WEIGHTS",
    "FCM",
    "HSG",
    "MODEL_KINDS",
    "MSS_HEADS",
    "POUTA",
    "PRESETS",
    "SIZE_MULTIPLE",
    "VARIANTS",
    "AEFeatures",
    "CueFusion",
    "ModelConfig",
    "ModelOutput",
    "Preset",
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


def build_model(cfg: ModelConfig) -> POUTA | VanillaDRAEM:
    """The module a config describes (fresh weights)."""
    cfg.validate()
    return POUTA(cfg) if cfg.kind == "pouta" else VanillaDRAEM(cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
