"""The one preprocessing implementation: trainer, calibration, export checks and the
edge runtime all turn a camera/file image into model input through this module.

Model input contract (see ``metadata.InputSpec``): float32, RGB, values in [0, 1],
layout [3, H, W] per image. Grayscale and 16-bit sources are accepted; grayscale is
replicated to three channels, integer images are scaled by their dtype's full range
unless an explicit ``bit_depth`` says how many bits are significant (Mono12 in uint16).

Two geometries (``pouta.edge.contract.geometry``), both described by one ``FrameGeometry`` per
frame: the whole (ROI of the) frame resized to the model's H x W, or, for tiled models,
the frame rescaled by ``Tiling.scale`` (the "work" image) and cut into H x W tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, ImageReadError
from .geometry import FrameGeometry, Roi, Tiling
from .metadata import ModelMetadata

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
)

_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def shrink_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Anti-aliased shrink to ``width`` x ``height`` (each at most the source size).

    OpenCV's INTER_AREA is fast only for integer factors (256 -> 224 costs 1 ms, 5x a
    bilinear resize), so the source is first resized bilinearly to the nearest integer
    multiple of the target (a shrink by less than 2x, where bilinear barely aliases) and
    then area-averaged by that integer factor. Within one grey level of INTER_AREA.
    """
    h, w = image.shape[:2]
    kx, ky = max(1, w // width), max(1, h // height)
    if (w, h) != (kx * width, ky * height):
        image = cv2.resize(image, (kx * width, ky * height), interpolation=cv2.INTER_LINEAR)
    if (kx, ky) == (1, 1):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as stored: HxW (gray) or HxWx3 BGR / HxWx4 BGRA, uint8 or uint16.

    Raises ``ImageReadError`` naming the file for a missing, empty or undecodable file.
    ``np.fromfile`` + ``imdecode`` instead of ``imread`` so non-ASCII paths work and a
    truncated file is reported rather than returned as ``None``.
    """
    p = Path(path)
    try:
        raw = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    if raw.size == 0:
        raise ImageReadError(f"{p}: file is empty, expected an image")
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"{p}: not a decodable image (corrupt or unsupported format)")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask as bool HxW (any non-zero pixel is defective)."""
    m = read_image(path)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


def to_rgb8_or_16(image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
    """Any supported image -> HxWx3 RGB of the same dtype (gray replicated, alpha dropped)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3:
        raise ValueError(f"image: expected HxW or HxWxC array, got shape {image.shape}")
    c = image.shape[2]
    order = color_order.upper()
    if c == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if c == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if order == "BGR" else image
    if c == 4:
        code = cv2.COLOR_BGRA2RGB if order == "BGR" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    raise ValueError(f"image: expected 1, 3 or 4 channels, got {c}")


def _scale_for(dtype: np.dtype, bit_depth: int | None) -> float:
    if bit_depth is not None:
        return 1.0 / float((1 << bit_depth) - 1)
    if dtype == np.uint8:
        return 1.0 / 255.0
    if dtype == np.uint16:
        return 1.0 / 65535.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"image: unsupported dtype {dtype}, expected uint8, uint16 or float")


@dataclass(frozen=True)
class Preprocessor:
    """Source image -> model input(s) float32 RGB in [0, 1]: one [3, H, W] image, or the
    [N, 3, H, W] tiles of the rescaled "work" image when ``tiling`` is set (``tiles``).

    Order matters for speed: crop and resize happen on the integer image, the float
    conversion last, on the small image only.
    """

    height: int
    width: int
    roi: Roi | None = None
    interpolation: str = "area"
    bit_depth: int | None = None
    tiling: Tiling | None = None

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"input size: expected positive height/width, got {self.height}x{self.width}")
        if self.interpolation not in _INTERPOLATION:
            raise ConfigError(
                f"interpolation: expected one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}"
            )

    def crop(self, image: np.ndarray) -> np.ndarray:
        if self.roi is None:
            return image
        r = self.roi.clip_to(image.shape[0], image.shape[1])
        return image[r.y : r.y + r.height, r.x : r.x + r.width]

    def geometry(self, source_shape: tuple[int, ...]) -> FrameGeometry:
        """Where this frame's model inputs come from and where their maps go back to."""
        sh, sw = int(source_shape[0]), int(source_shape[1])
        roi = self.roi.clip_to(sh, sw) if self.roi is not None else Roi(0, 0, sw, sh)
        if self.tiling is None:
            work = (self.height, self.width)
            return FrameGeometry((sh, sw), roi, work, (self.height, self.width), ((0, 0),))
        work = self.tiling.work_size(roi.height, roi.width)
        origins = self.tiling.origins(work, (self.height, self.width))
        return FrameGeometry((sh, sw), roi, work, (self.height, self.width), origins)

    def geometry_of_work(self, work_hw: tuple[int, ...]) -> FrameGeometry:
        """The geometry of an image already brought to work size (source = work, no ROI)."""
        wh, ww = int(work_hw[0]), int(work_hw[1])
        origins = self.tiling.origins((wh, ww), (self.height, self.width)) if self.tiling else ((0, 0),)
        return FrameGeometry((wh, ww), Roi(0, 0, ww, wh), (wh, ww), (self.height, self.width), origins)

    def resize_hwc(self, image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
        """Crop + resize + RGB, keeping the source dtype: HxWx3 at work size.

        The work size is the model size for whole-image models and the rescaled image
        for tiled ones.
        """
        return self._resize(image, self.geometry(image.shape).work_hw, color_order)

    def _resize(self, image: np.ndarray, work_hw: tuple[int, int], color_order: str) -> np.ndarray:
        img = self.crop(image)
        wh, ww = work_hw
        if img.shape[0] != wh or img.shape[1] != ww:
            interp = _INTERPOLATION[self.interpolation]
            # INTER_AREA is only an anti-aliasing filter when shrinking.
            if interp == cv2.INTER_AREA and (img.shape[0] < wh or img.shape[1] < ww):
                interp = cv2.INTER_LINEAR
            if interp == cv2.INTER_AREA:
                img = shrink_area(img, ww, wh)
            else:
                img = cv2.resize(img, (ww, wh), interpolation=interp)
        return to_rgb8_or_16(img, color_order)

    def to_float(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 RGB (uint8/uint16/float) -> [3, H, W] float32 in [0, 1]."""
        scale = _scale_for(rgb.dtype, self.bit_depth)
        chw = np.empty((3, rgb.shape[0], rgb.shape[1]), dtype=np.float32)
        for c in range(3):
            np.multiply(rgb[:, :, c], scale, out=chw[c], casting="unsafe")
        if self.bit_depth is not None or rgb.dtype.kind == "f":
            np.clip(chw, 0.0, 1.0, out=chw)
        return chw

    def __call__(self, image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
        """The work image as [3, h, w] float32 (the model input itself when not tiled)."""
        return self.to_float(self.resize_hwc(image, color_order))

    def tiles(self, image: np.ndarray, color_order: str = "BGR") -> tuple[np.ndarray, FrameGeometry]:
        """Model inputs of one frame: [N, 3, H, W] float32 (N = 1 when not tiled) and its geometry."""
        geo = self.geometry(image.shape)
        return geo.cut(self.to_float(self._resize(image, geo.work_hw, color_order))), geo

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground-truth mask through the same geometry (nearest neighbour): bool at work size."""
        wh, ww = self.geometry(mask.shape).work_hw
        m = self.crop(mask.astype(np.uint8))
        m = cv2.resize(m, (ww, wh), interpolation=cv2.INTER_NEAREST)
        return m > 0


def preprocessor_for(
    meta: ModelMetadata, roi: Roi | None = None, interpolation: str = "area", bit_depth: int | None = None
) -> Preprocessor:
    """The preprocessor an artifact was trained for, tiling included (from its metadata)."""
    i = meta.input
    tiling = Tiling(i.tile_scale, i.tile_overlap) if i.tile_scale else None
    return Preprocessor(
        i.height, i.width, roi=roi, interpolation=interpolation, bit_depth=bit_depth, tiling=tiling
    )
