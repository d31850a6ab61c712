"""The one preprocessing implementation: trainer, calibration, export checks and the
edge runtime all turn a camera/file image into model input through this module.

Model input contract (see ``metadata.ModelContract``): float32, RGB, values in [0, 1],
layout [3, H, W] per image. Grayscale and 16-bit sources are accepted; grayscale is
replicated to three channels, integer images are scaled by their dtype's full range
unless an explicit ``bit_depth`` says how many bits are significant (Mono12 in uint16).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, ImageReadError

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
class Roi:
    """Region of interest in source pixels: x, y (top-left), width, height."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, value: Sequence[int] | str | None) -> Roi | None:
        if value is None or value == "" or value == []:
            return None
        parts = [p for p in value.replace(",", " ").split() if p] if isinstance(value, str) else list(value)
        try:
            x, y, w, h = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ConfigError(f"roi: expected 'x,y,width,height' integers, got {value!r}") from None
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise ConfigError(f"roi: expected x,y >= 0 and width,height > 0, got {value!r}")
        return cls(x, y, w, h)

    def clip_to(self, height: int, width: int) -> Roi:
        if self.x >= width or self.y >= height:
            raise ValueError(f"roi {self} lies outside the {width}x{height} image")
        return Roi(self.x, self.y, min(self.width, width - self.x), min(self.height, height - self.y))


@dataclass(frozen=True)
class Preprocessor:
    """Source image -> model input [3, H, W] float32 RGB in [0, 1].

    Order matters for speed: crop and resize happen on the integer image, the float
    conversion last, on the small image only.
    """

    height: int
    width: int
    roi: Roi | None = None
    interpolation: str = "area"
    bit_depth: int | None = None

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

    def resize_hwc(self, image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
        """Crop + resize + RGB, keeping the source dtype: HxWx3 at model size."""
        img = self.crop(image)
        if img.shape[0] != self.height or img.shape[1] != self.width:
            interp = _INTERPOLATION[self.interpolation]
            # INTER_AREA is only an anti-aliasing filter when shrinking.
            if interp == cv2.INTER_AREA and (img.shape[0] < self.height or img.shape[1] < self.width):
                interp = cv2.INTER_LINEAR
            if interp == cv2.INTER_AREA:
                img = shrink_area(img, self.width, self.height)
            else:
                img = cv2.resize(img, (self.width, self.height), interpolation=interp)
        return to_rgb8_or_16(img, color_order)

    def __call__(self, image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
        rgb = self.resize_hwc(image, color_order)
        scale = _scale_for(rgb.dtype, self.bit_depth)
        chw = np.empty((3, self.height, self.width), dtype=np.float32)
        for c in range(3):
            np.multiply(rgb[:, :, c], scale, out=chw[c], casting="unsafe")
        if self.bit_depth is not None or rgb.dtype.kind == "f":
            np.clip(chw, 0.0, 1.0, out=chw)
        return chw

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground-truth mask through the same geometry (nearest neighbour): bool [H, W]."""
        m = self.crop(mask.astype(np.uint8))
        m = cv2.resize(m, (self.width, self.height), interpolation=cv2.INTER_NEAREST)
        return m > 0

    def map_to_source(self, amap: np.ndarray, source_shape: tuple[int, ...]) -> np.ndarray:
        """Model-size anomaly map [H, W] -> source-size map (zeros outside the ROI)."""
        sh, sw = int(source_shape[0]), int(source_shape[1])
        if self.roi is None:
            return cv2.resize(amap, (sw, sh), interpolation=cv2.INTER_LINEAR)
        r = self.roi.clip_to(sh, sw)
        out = np.zeros((sh, sw), dtype=amap.dtype)
        out[r.y : r.y + r.height, r.x : r.x + r.width] = cv2.resize(
            amap, (r.width, r.height), interpolation=cv2.INTER_LINEAR
        )
        return out


def batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack preprocessed [3,H,W] images into a contiguous [N,3,H,W] float32 batch."""
    return np.ascontiguousarray(np.stack(images, axis=0), dtype=np.float32)
