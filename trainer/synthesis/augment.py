"""Photometric and geometric augmentations of the anomaly source (DRAEM draws 3 of them)."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def rotate_image(img: np.ndarray, degrees: float, border: int = cv2.BORDER_REFLECT_101) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


# All take and return HxWx3 float32 RGB in [0, 1]; DRAEM's 10 imgaug operations.


def _gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.power(x, rng.uniform(0.5, 2.0, size=3).astype(np.float32))


def _brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30) / 255.0


def _sharpness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    smooth = cv2.blur(x, (3, 3))
    return smooth + rng.uniform(0.0, 2.0) * (x - smooth)


def _hue_saturation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(np.clip(x, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-50, 50) * 360.0 / 255.0) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.uniform(-50, 50) / 255.0, 0.0, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _solarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return x
    t = rng.uniform(32, 128) / 255.0
    return np.where(x >= t, 1.0 - x, x)


def _posterize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = 2 ** int(rng.integers(1, 9))
    return np.floor(np.clip(x, 0, 1) * (levels - 1) + 0.5) / (levels - 1)


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _autocontrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo = x.min(axis=(0, 1), keepdims=True)
    hi = x.max(axis=(0, 1), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-6)


def _equalize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u8 = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.stack([cv2.equalizeHist(u8[..., c]) for c in range(3)], axis=-1).astype(np.float32) / 255.0


def _affine_rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rotate_image(x, rng.uniform(-45, 45))


AUGMENTS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _affine_rotate,
)
