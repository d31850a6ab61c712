"""Model configuration: one dataclass, two width presets, JSON-friendly.

The config is the single description of a network: checkpoints store it as JSON,
the exporter copies it into the artifact's metadata, and ``build_model`` rebuilds the
exact module from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.metadata import MODEL_KINDS as EDGE_MODEL_KINDS

MODEL_KINDS: tuple[str, ...] = tuple(k for k in EDGE_MODEL_KINDS if k != "test")
# Kinds built on a frozen pretrained backbone (``backbone.py``): their input sides are
# multiples of ``BACKBONE_SIZE_MULTIPLE`` and their preset size is ``BACKBONE_SIZE``.
BACKBONE_KINDS: tuple[str, ...] = ("prn", "features", "redi")
BACKBONE_SIZE = 256
BACKBONE_SIZE_MULTIPLE = 32
VARIANTS: tuple[str, ...] = ("full", "base", "hsg", "mss")
MSS_HEADS: tuple[str, ...] = ("conv1x1", "conv3x3")
CUE_ERRORS: tuple[str, ...] = ("ssim", "squared")
REDI_STRUCTURES: tuple[str, ...] = ("hog", "edges")
# Four 2x max-pools (three between encoder scales, one before the mapping layer).
SIZE_MULTIPLE = 16


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model.

    ``ae_widths``: channels of encoder scales F_E1..F_E4 (the decoder mirrors them,
    the mapping layer keeps F_E4's width). ``disc_widths``: channels of the POUTA
    contrastive features F_C1..F_C4. ``fusion_width``: hidden channels of the 2-conv
    fusion layer. ``unet_base``: first U-Net width of the vanilla discriminator
    (widths base, 2b, 4b, 8b, bottleneck 8b). ``mss_head``: the paper leaves the MSS
    head open; ``conv1x1`` (default) is a 1x1 conv to 2 classes, bilinear upsample to
    input size, softmax; ``conv3x3`` is one 3x3 conv to 2 classes instead.
    ``fusion_scale``: the common size the fusion layer works at, the size of F_C(scale):
    1 = input resolution, 2 = half, 3 = quarter (the logits are then bilinearly upsampled
    to the input size, which also makes the map smoother). ``map_sigma``: Gaussian blur
    (pixels at input size, fixed, not trained) applied to the anomaly map inside ``forward``
    before the image score; 0 turns it off. ``map_sigma_hw``: (rows, columns) blur of the map
    the model returns, when it should differ from the score's round ``map_sigma``; the
    trainer sets it round on the part for a whole-image input that squashes one axis more
    than the other (``trainer.geometry.map_blur_setting``); None = ``map_sigma`` both ways.
    ``reconstruction_cue``: the anomaly map also
    weighs the autoencoder's own reconstruction error (``layers.CueFusion``); ``cue_scales``
    are its two normalisers (the mean image score of the discriminator's map and of the
    reconstruction error on normal training inputs), fitted after training; while they are
    None the map is the discriminator's alone. ``cue_weights``: each cue's share of the fused
    map, fitted with the scales (proportional to the mean over the spread of the cue's image
    scores on those inputs); None = equal halves, as models fitted before the field existed
    were. ``cue_error``: how the reconstruction error is
    measured, ``ssim`` (1 - local SSIM) or ``squared``; a config written before the field
    existed was fitted on ``squared`` and reads back as such (``from_dict``).
    """

    kind: str = "pouta"
    variant: str = "full"
    preset: str = "tiny"
    height: int = 128
    width: int = 128
    ae_widths: tuple[int, int, int, int] = (16, 32, 64, 64)
    disc_widths: tuple[int, int, int, int] = (16, 16, 32, 32)
    fusion_width: int = 16
    fusion_scale: int = 3
    unet_base: int = 8
    mss_head: str = "conv1x1"
    map_sigma: float = 4.0
    map_sigma_hw: tuple[float, float] | None = None
    reconstruction_cue: bool = False
    cue_scales: tuple[float, float] | None = None
    cue_weights: tuple[float, float] | None = None
    cue_error: str = "ssim"
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    memory_size: int = 2048
    distance_scale: float | None = None
    prn_width: int = 32
    prototypes: int = 0
    redi_structure: str = "hog"
    redi_hog_bins: int = 9
    redi_gallery: int = 16
    redi_width: int = 32
    redi_hip: bool = True
    redi_self_correlation: bool = True
    redi_frb: bool = True
    redi_train_crop: int = 0

    def __post_init__(self) -> None:
        self.ae_widths = tuple(int(v) for v in self.ae_widths)  # type: ignore[assignment]
        self.disc_widths = tuple(int(v) for v in self.disc_widths)  # type: ignore[assignment]
        for name in _PAIR_FIELDS:  # JSON gives lists; anything else is left for ``validate``
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def hsg(self) -> bool:
        return self.kind == "pouta" and self.variant in ("full", "hsg")

    @property
    def mss(self) -> bool:
        return self.kind == "pouta" and self.variant in ("full", "mss")

    def validate(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind: expected one of {MODEL_KINDS}, got {self.kind!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.mss_head not in MSS_HEADS:
            raise ConfigError(f"model.mss_head: expected one of {MSS_HEADS}, got {self.mss_head!r}")
        if self.fusion_scale not in (1, 2, 3, 4):
            raise ConfigError(f"model.fusion_scale: expected 1, 2, 3 or 4, got {self.fusion_scale!r}")
        for name in ("ae_widths", "disc_widths"):
            v = getattr(self, name)
            if len(v) != 4 or any(c <= 0 for c in v):
                raise ConfigError(f"model.{name}: expected 4 positive integers, got {list(v)}")
        if not isinstance(self.map_sigma, (int, float)) or not 0 <= self.map_sigma <= 32:
            raise ConfigError(f"model.map_sigma: expected a number in [0, 32], got {self.map_sigma!r}")
        hw = self.map_sigma_hw
        if hw is not None and not _number_pair(hw, lambda v: 0 <= v <= 32):
            raise ConfigError(
                f"model.map_sigma_hw: expected null or two numbers in [0, 32] (rows, columns), got {hw!r}"
            )
        if not isinstance(self.reconstruction_cue, bool):
            raise ConfigError(
                f"model.reconstruction_cue: expected true or false, got {self.reconstruction_cue!r}"
            )
        if self.cue_error not in CUE_ERRORS:
            raise ConfigError(f"model.cue_error: expected one of {CUE_ERRORS}, got {self.cue_error!r}")
        cs = self.cue_scales
        if cs is not None and not _number_pair(cs, lambda v: 0 < v < float("inf")):
            raise ConfigError(f"model.cue_scales: expected null or two positive numbers, got {cs!r}")
        cw = self.cue_weights
        if cw is not None and not (_number_pair(cw, lambda v: 0 <= v <= 1) and abs(sum(cw) - 1.0) < 1e-6):
            raise ConfigError(
                f"model.cue_weights: expected null or two numbers in [0, 1] that sum to 1, got {cw!r}"
            )
        if self.fusion_width <= 0 or self.unet_base <= 0:
            raise ConfigError("model.fusion_width / model.unet_base: expected positive integers")
        if self.redi_structure not in REDI_STRUCTURES:
            raise ConfigError(
                f"model.redi_structure: expected one of {REDI_STRUCTURES}, got {self.redi_structure!r}"
            )
        for name in ("redi_hip", "redi_self_correlation", "redi_frb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}: expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.redi_width, int) or isinstance(self.redi_width, bool) or self.redi_width < 8:
            raise ConfigError(f"model.redi_width: expected an integer >= 8, got {self.redi_width!r}")
        rc = self.redi_train_crop
        if not isinstance(rc, int) or isinstance(rc, bool) or rc < 0 or rc % BACKBONE_SIZE_MULTIPLE:
            raise ConfigError(
                f"model.redi_train_crop: expected 0 (whole input) or a positive multiple of "
                f"{BACKBONE_SIZE_MULTIPLE}, got {rc!r}"
            )
        for name in ("memory_size", "prn_width", "redi_hog_bins", "redi_gallery"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model.{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.prototypes, int) or self.prototypes < 0:
            raise ConfigError(f"model.prototypes: expected a non-negative integer, got {self.prototypes!r}")
        ds = self.distance_scale
        if ds is not None and not (
            isinstance(ds, (int, float)) and not isinstance(ds, bool) and 0 < ds < float("inf")
        ):
            raise ConfigError(f"model.distance_scale: expected null or a positive number, got {ds!r}")
        if self.backbone_weights is not None and not isinstance(self.backbone_weights, str):
            raise ConfigError(
                f"model.backbone_weights: expected null or a file path, got {self.backbone_weights!r}"
            )
        if self.kind in BACKBONE_KINDS:
            from .backbone import BACKBONES

            if self.backbone not in BACKBONES:
                raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {self.backbone!r}")
            check_input_size(self.height, self.width, "model.height/width", self.size_multiple)
        else:
            check_input_size(self.height, self.width, "model.height/width")

    @property
    def size_multiple(self) -> int:
        """What both input sides must be a multiple of."""
        return BACKBONE_SIZE_MULTIPLE if self.kind in BACKBONE_KINDS else SIZE_MULTIPLE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ae_widths"] = list(self.ae_widths)
        d["disc_widths"] = list(self.disc_widths)
        for name in _PAIR_FIELDS:
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown model field(s) {unknown}, expected some of {sorted(names)}")
        if d.get("cue_scales") is not None and "cue_error" not in d:
            # Fitted before ``cue_error`` existed, when the cue was the squared error.
            d = {**d, "cue_error": "squared"}
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"{source}: malformed model config ({exc})") from None

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


_PAIR_FIELDS = ("map_sigma_hw", "cue_scales", "cue_weights")  # tuples here, lists in JSON


def _number_pair(value: object, ok: Callable[[float], bool]) -> bool:
    """Whether ``value`` is a tuple of two real numbers (not bools) that each pass ``ok``."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v) for v in value)
    )


def check_input_size(height: int, width: int, what: str = "input", multiple: int = SIZE_MULTIPLE) -> None:
    """Both sides must be positive multiples of ``multiple`` (16: four 2x down-samplings)."""
    if (
        not isinstance(height, int)
        or not isinstance(width, int)
        or height < multiple
        or width < multiple
        or height % multiple
        or width % multiple
    ):
        raise ConfigError(
            f"{what}: size {height}x{width} (HxW) is not supported, both sides must be "
            f"positive multiples of {multiple}"
        )


@dataclass(frozen=True)
class Preset:
    """Width preset: the fields a preset sets; kind/variant/size stay the caller's."""

    name: str
    height: int
    width: int
    values: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Widths chosen so that at 224x224 POUTA has ~15.0M params and vanilla ~28.7M
    # (paper Table 5); `pouta-cost` prints the exact numbers.
    "paper": Preset(
        "paper",
        224,
        224,
        {
            "ae_widths": (50, 100, 200, 400),
            "disc_widths": (32, 64, 128, 256),
            "fusion_width": 64,
            "fusion_scale": 2,
            "unet_base": 55,
        },
    ),
    # Small enough to train a useful detector in minutes on a 2-core CPU.
    "tiny": Preset(
        "tiny",
        128,
        128,
        {
            "ae_widths": (16, 32, 64, 64),
            "disc_widths": (16, 16, 32, 32),
            "fusion_width": 16,
            # Quarter-resolution fusion: 4x cheaper than full resolution and a smoother
            # map, which ranked pixels better at equal CPU budget (README, model choices).
            "fusion_scale": 3,
            "unet_base": 8,
            # A ~1000-step discriminator alone misses defects its autoencoder already fails
            # to reconstruct; adding that error ranked images and pixels better on the real
            # categories measured (README, model choices).
            "reconstruction_cue": True,
        },
    ),
}


def preset_config(
    preset: str = "tiny",
    kind: str = "pouta",
    variant: str = "full",
    height: int | None = None,
    width: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A ``ModelConfig`` from a named preset, with optional size and field overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    values = {**p.values, **overrides}
    # One pretrained trunk serves every preset: its input is the size it sees detail at.
    side = BACKBONE_SIZE if kind in BACKBONE_KINDS else None
    return ModelConfig(
        kind=kind,
        variant=variant,
        preset=preset,
        height=(side or p.height) if height is None else height,
        width=(side or p.width) if width is None else width,
        **values,
    )
