"""Choose the input geometry of a model from its training images.

Default (``data.tile_scale: off``): the whole image resized to the preset's H x W
(``tiny`` 128 x 128). Measured on the five real categories at equal CPU budgets, the
whole-image model ranked images better than tiles on every one of them (README, quality),
so tiling is chosen, not automatic. Rules of ``--tile-scale auto``:

- The model input (tile) is the preset's H x W unless ``--size`` says.
- Images that a whole-image input shrinks by at most 2x (e.g. up to 256 x 256 for
  ``tiny``) stay whole: the model keeps the global view, which large defects (a missing
  piece of a bottle) need.
- Larger ones are tiled. Work scale ``s = min(1, 2 * tile_short_side / median_short_side)``:
  never upscaled, and shrunk only until the short side is two tiles long, so thin cracks
  and small pits keep most of their pixels; random tile-size crops of the work image in
  training, overlapping tiles (``Tiling.overlap``) batched into one call at inference.
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
from pouta.edge.errors import ConfigError, ImageReadError
from pouta.edge.geometry import Tiling
from pouta.edge.preprocess import Preprocessor, read_image

WORK_SHORT_SIDE_IN_TILES = 2.0
WHOLE_IMAGE_MAX_DOWNSCALE = 2.0
DEFAULT_OVERLAP = 0.25
MIN_DEFECT_PX = 2.0  # a defect narrower than this at model scale is hard to see
WARN_DOWNSCALE = 2.0  # past this, a 4 px defect at source shrinks below MIN_DEFECT_PX
PROBE_IMAGES = 32


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
    downscale: float  # source pixels per model pixel (the larger of both axes)

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
            "if the line has such defects, try --tile-scale auto (tiles at a higher resolution)"
        )


def _round16(v: float) -> int:
    return max(32, round(v / 16.0) * 16)


def choose_geometry(
    stats: DataStats, tile_hw: tuple[int, int], tile_scale: float | str | None, whole_auto: bool = False
) -> Geometry:
    """Apply the rules of this module's docstring."""
    mh, mw = stats.median_hw
    th, tw = tile_hw
    if whole_auto:
        area = float(th * tw)
        h = _round16(math.sqrt(area * mh / mw))
        w = _round16(area / h)
        h, w = min(h, 4 * max(th, tw)), min(w, 4 * max(th, tw))
        return Geometry(h, w, None, max(mh / h, mw / w))
    if tile_scale in (None, 0, "off", False):
        return Geometry(th, tw, None, max(mh / th, mw / tw))
    if tile_scale == "auto":
        whole_downscale = max(mh / th, mw / tw)
        scale = min(1.0, WORK_SHORT_SIDE_IN_TILES * min(th, tw) / min(mh, mw))
        if whole_downscale <= WHOLE_IMAGE_MAX_DOWNSCALE or (mh * scale <= th and mw * scale <= tw):
            return Geometry(th, tw, None, whole_downscale)
    else:
        try:
            scale = float(tile_scale)
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.tile_scale: expected auto, off or a number, got {tile_scale!r}"
            ) from None
    tiling = Tiling(scale, DEFAULT_OVERLAP)
    return Geometry(th, tw, tiling, 1.0 / scale)


def tiling_of(train_config: dict[str, Any]) -> Tiling | None:
    """The tiling a (resolved) training config fixed: ``data.tile_scale`` a number, else None."""
    scale = (train_config.get("data") or {}).get("tile_scale")
    if isinstance(scale, int | float) and not isinstance(scale, bool) and scale > 0:
        return Tiling(float(scale), DEFAULT_OVERLAP)
    return None


def preprocessor_for_training(train_config: dict[str, Any], height: int, width: int) -> Preprocessor:
    """The preprocessor a model was trained with: model size and the config's tiling."""
    return Preprocessor(height, width, tiling=tiling_of(train_config))
