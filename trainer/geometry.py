"""Choose the input geometry of a model from its training images.

Default (``data.tile_scale: auto``) picks between two geometries by the images' median
shape, against the model input (the preset's H x W, ``tiny`` 128 x 128, or ``--size``):

- **Whole image**, resized to H x W, for images about as wide as tall (long / short side
  under ``ELONGATED_ASPECT``) and for any image a whole-image input shrinks by at most 2x.
  The model keeps the global view, which large defects (a missing piece of a bottle)
  need; measured at equal CPU budgets it ranked near-square parts (castings, solar
  cells) better than tiles did (README, quality).
- **Tiles** for elongated images that a square input would shrink more than 2x: squashing
  them into a square shrinks the long axis ``aspect`` times more than the short one, so
  thin cracks and small pits across it vanish first (a 4096 x 256 fabric web loses 32x
  along its length). Work scale ``s = min(1, 2 * tile_short_side / median_short_side)``:
  never upscaled, shrunk only until the short side is two tiles long; random tile-size
  crops of the work image in training, overlapping tiles (``Tiling.overlap``) batched
  into one call at inference. Measured on ball-screw pitting (1130 x 460, 21 tiles) the
  tiles ranked images as well as the whole image and localised the pits far better.
- ...unless that takes more than ``MAX_AUTO_TILES`` tiles per frame: then the whole image.
  Run time grows with the tiles (every tile is a model input), and the frame's score, a
  maximum over all tiles, picks up more normal texture with every tile: on the 4096 x 256
  fabric web (129 tiles at native scale) tiles ranked images worse than the whole image.
- ``--tile-scale off`` forces the whole image, ``--tile-scale 0.5`` (a number) forces
  tiles at that work scale (e.g. small defects on large near-square parts).
- The reconstruction cue (``model.reconstruction_cue: auto`` in ``tiny``) follows the choice:
  on for whole images, off for tiles, where the small autoencoder cannot reproduce fine
  surface texture near native scale and its error drowned small pits (README, model
  choices). ``true`` or ``false`` set explicitly are kept either way.
- The discriminator follows it too (``model.disc_widths`` and ``model.fusion_width``:
  ``auto`` in ``tiny``): the preset's widths for whole images, ``TILED_DISC_WIDEN`` times
  them for tiles. Near native scale the discriminator must tell fine surface structure
  from small defects; on ball-screw tiles the wider one ranked images better in every
  run, on whole images it ranked no better and costs more per step (README, model
  choices). Widths set explicitly are kept either way.
- The anomaly map's blur (``model.map_sigma_hw: auto``) is round on the part: a whole
  image squashed into the input (a 4096 x 256 fabric web into 128 x 128 shrinks 32x across
  and 2x down) blurs its map less along the squashed axis, so a thin defect is not spread
  over 16x more fabric across than down. The image score keeps the round ``map_sigma`` blur
  in input pixels: on the fabric the map blurred round on the part localised defects
  better (pixel AUROC), but a score pooled from it ranked images worse (README, model
  choices).
- ``--size auto`` instead keeps one whole-image input with the training images' median
  aspect ratio and the preset's pixel count, each side a multiple of 16 (long side at most
  4x the preset side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pouta.edge.contract.errors import ConfigError, ImageReadError
from pouta.edge.contract.geometry import Tiling
from pouta.edge.contract.preprocess import Preprocessor, read_image

WORK_SHORT_SIDE_IN_TILES = 2.0
WHOLE_IMAGE_MAX_DOWNSCALE = 2.0
ELONGATED_ASPECT = 2.0  # median long / short side from which ``auto`` tiles
MAX_AUTO_TILES = 32  # ``auto`` never picks more tiles per frame than this
DEFAULT_OVERLAP = 0.25
MIN_DEFECT_PX = 2.0  # a defect narrower than this at model scale is hard to see
WARN_DOWNSCALE = 2.0  # past this, a 4 px defect at source shrinks below MIN_DEFECT_PX
PROBE_IMAGES = 32
TILED_DISC_WIDEN = 2  # ``auto`` discriminator widths on tiles: the preset's times this
AUTO_WIDTHS = ("disc_widths", "fusion_width")  # the model fields ``width_setting`` resolves


@dataclass(frozen=True)
class DataStats:
    """What the training images look like (a deterministic sample of them)."""

    n_images: int
    n_probed: int
    median_hw: tuple[int, int]
    min_hw: tuple[int, int]
    max_hw: tuple[int, int]
    channels: tuple[int, ...]
    dtypes: tuple[str, ...]

    def describe(self) -> str:
        def size(hw: tuple[int, int]) -> str:
            return f"{hw[1]}x{hw[0]}"

        ch = "/".join("gray" if c == 1 else f"{c}-channel" for c in self.channels)
        return (
            f"{self.n_images} images (probed {self.n_probed}): median {size(self.median_hw)} (WxH), "
            f"from {size(self.min_hw)} to {size(self.max_hw)}, {ch}, {'/'.join(self.dtypes)}"
        )


def scan_images(paths: Sequence[Path], probe: int = PROBE_IMAGES) -> DataStats:
    """Sizes, channels and bit depth of up to ``probe`` images spread evenly over ``paths``."""
    if not paths:
        raise ConfigError("training data: no images to scan")
    idx = np.unique(np.linspace(0, len(paths) - 1, min(probe, len(paths))).round().astype(int))
    shapes, channels, dtypes = [], set(), set()
    for i in idx:
        try:
            img = read_image(paths[int(i)])
        except ImageReadError:
            continue
        shapes.append(img.shape[:2])
        channels.add(1 if img.ndim == 2 else int(img.shape[2]))
        dtypes.add(str(img.dtype))
    if not shapes:
        raise ImageReadError(f"training data: none of the {len(idx)} probed images could be read")
    arr = np.array(shapes)
    return DataStats(
        n_images=len(paths),
        n_probed=len(shapes),
        median_hw=(int(np.median(arr[:, 0])), int(np.median(arr[:, 1]))),
        min_hw=(int(arr[:, 0].min()), int(arr[:, 1].min())),
        max_hw=(int(arr[:, 0].max()), int(arr[:, 1].max())),
        channels=tuple(sorted(channels)),
        dtypes=tuple(sorted(dtypes)),
    )


@dataclass(frozen=True)
class Geometry:
    """The chosen model input: H x W, and the tiling (None = whole image resized to H x W)."""

    height: int
    width: int
    tiling: Tiling | None
    axis_downscale: tuple[float, float]  # source pixels per model pixel (rows, columns)
    tile_scale_hint: float | None = None  # the work scale tiles would use (whole-image choices)

    @property
    def downscale(self) -> float:
        """Source pixels per model pixel along the axis that shrinks most."""
        return max(self.axis_downscale)

    def describe(self) -> str:
        smallest = (
            f"defects under {self.downscale * MIN_DEFECT_PX:.1f} source px shrink below {MIN_DEFECT_PX:g} px"
        )
        if self.tiling is None:
            return f"whole image resized to {self.width}x{self.height} (WxH), {self.downscale:.2f}x downscale; {smallest}"
        return (
            f"tiles of {self.width}x{self.height} (WxH) at scale {self.tiling.scale:.4g} "
            f"(overlap {self.tiling.overlap:g}), {self.downscale:.2f}x downscale; {smallest}"
        )

    def small_defect_warning(self) -> str | None:
        if self.downscale <= WARN_DOWNSCALE:
            return None
        return (
            f"defects narrower than {self.downscale * MIN_DEFECT_PX:.0f} source px will be under "
            f"{MIN_DEFECT_PX:g} px at the model's scale ({self.downscale:.1f}x downscale); "
            f"if the line has such defects, try --tile-scale {self.tile_scale_hint or 0.5:.3g} "
            "(tiles at a higher resolution)"
        )


def _round16(v: float, multiple: int = 16) -> int:
    return max(32, round(v / multiple) * multiple)


def _work_scale(image_hw: tuple[int, int], tile_hw: tuple[int, int]) -> float:
    """Tiles' work scale: shrink until the short side is two tiles long, never enlarge."""
    return min(1.0, WORK_SHORT_SIDE_IN_TILES * min(tile_hw) / min(image_hw))


def _auto_keeps_whole(image_hw: tuple[int, int], tile_hw: tuple[int, int], scale: float) -> bool:
    """``auto``'s choice: near-square, shrunk at most 2x, or too many tiles at ``scale``."""
    (mh, mw), (th, tw) = image_hw, tile_hw
    if max(mh, mw) / min(mh, mw) < ELONGATED_ASPECT:
        return True
    if max(mh / th, mw / tw) <= WHOLE_IMAGE_MAX_DOWNSCALE:
        return True
    tiling = Tiling(scale, DEFAULT_OVERLAP)
    return len(tiling.origins(tiling.work_size(mh, mw), tile_hw)) > MAX_AUTO_TILES


def choose_geometry(
    stats: DataStats,
    tile_hw: tuple[int, int],
    tile_scale: float | str | None,
    whole_auto: bool = False,
    multiple: int = 16,
) -> Geometry:
    """Apply the rules of this module's docstring."""
    mh, mw = stats.median_hw
    th, tw = tile_hw
    work_scale = _work_scale(stats.median_hw, tile_hw)  # what tiles would use: also the hint
    if whole_auto:
        area = float(th * tw)
        h = _round16(math.sqrt(area * mh / mw), multiple)
        w = _round16(area / h, multiple)
        h, w = min(h, 4 * max(th, tw)), min(w, 4 * max(th, tw))
        return Geometry(h, w, None, (mh / h, mw / w), work_scale)
    if tile_scale in (None, 0, "off", False) or (
        tile_scale == "auto" and _auto_keeps_whole(stats.median_hw, tile_hw, work_scale)
    ):
        return Geometry(th, tw, None, (mh / th, mw / tw), work_scale)
    if tile_scale == "auto":
        scale = work_scale
    else:
        try:
            scale = float(tile_scale)
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.tile_scale: expected auto, off or a number, got {tile_scale!r}"
            ) from None
    return Geometry(th, tw, Tiling(scale, DEFAULT_OVERLAP), (1.0 / scale, 1.0 / scale))


def cue_setting(value: bool | str, tiled: bool) -> bool:
    """``model.reconstruction_cue`` for an input geometry: ``auto`` = on unless tiled."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return not tiled
    raise ConfigError(f"model.reconstruction_cue: expected auto, true or false, got {value!r}")


def width_setting(
    key: str, value: int | Sequence[int] | str, preset_value: int | Sequence[int], tiled: bool
) -> int | list[int]:
    """``model.disc_widths`` / ``model.fusion_width`` for an input geometry: ``auto`` = the
    preset's value, times ``TILED_DISC_WIDEN`` when tiled; anything else is kept as set."""
    if isinstance(value, str):
        if value != "auto":
            what = "a positive integer" if isinstance(preset_value, int) else "positive integers"
            raise ConfigError(f"model.{key}: expected auto or {what}, got {value!r}")
        factor = TILED_DISC_WIDEN if tiled else 1
        if isinstance(preset_value, int):
            return preset_value * factor
        return [int(v) * factor for v in preset_value]
    return value if isinstance(value, int) else list(value)


def map_blur_setting(
    value: Sequence[float] | str | None, map_sigma: float, axis_downscale: tuple[float, float] | None
) -> list[float] | None:
    """``model.map_sigma_hw`` for an input geometry: ``auto`` = the map's blur round on the part.

    ``axis_downscale``: source pixels per input pixel down and across (None for tiles, which
    keep the part's proportions). ``map_sigma`` along the axis the input shrinks least, and
    along the other ``map_sigma`` times the ratio of the two downscales, so both cover the
    same source pixels; None (round in input pixels, the score's own blur) when the input
    shrinks both axes alike. Values set explicitly are kept (``ModelConfig`` checks them),
    null means round.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return list(value)
    if value != "auto":
        raise ConfigError(
            f"model.map_sigma_hw: expected auto, null or two numbers (rows, columns), got {value!r}"
        )
    if axis_downscale is None:
        return None
    dh, dw = axis_downscale
    least = min(dh, dw)
    sigma_hw = [map_sigma * least / dh, map_sigma * least / dw]
    if math.isclose(sigma_hw[0], sigma_hw[1], rel_tol=1e-6):
        return None
    return [round(v, 4) for v in sigma_hw]


def tiling_of(train_config: dict[str, Any]) -> Tiling | None:
    """The tiling a (resolved) training config fixed: ``data.tile_scale`` a number, else None."""
    scale = (train_config.get("data") or {}).get("tile_scale")
    if isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0:
        return Tiling(float(scale), DEFAULT_OVERLAP)
    return None


def preprocessor_for_training(train_config: dict[str, Any], height: int, width: int) -> Preprocessor:
    """The preprocessor a model was trained with: model size and the config's tiling."""
    return Preprocessor(height, width, tiling=tiling_of(train_config))
