"""Texture photos that synthetic anomalies are cut from: a folder (e.g. DTD) or the real
photos inside scikit-image's wheel (no download)."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pouta.edge.contract.errors import ConfigError, ImageReadError
from pouta.edge.contract.preprocess import is_image_file, read_image, to_rgb8_or_16

# Real photos inside scikit-image's wheel (no download). Textures first: they are the
# closest to DTD; the rest add colour and structure variety.
BUILTIN_TEXTURES: tuple[str, ...] = (
    "brick",
    "gravel",
    "grass",
    "rocket",
    "coffee",
    "astronaut",
    "camera",
    "chelsea",
    "coins",
    "moon",
    "text",
    "page",
    "cell",
    "clock",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
)


def _load_builtin(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img)  # already RGB


class TextureSource:
    """Texture photos as HxWx3 uint8 RGB, loaded on first use and kept in a small LRU cache."""

    def __init__(self, texture_dir: str | os.PathLike[str] | None, cache_size: int = 256) -> None:
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(1, cache_size)
        if texture_dir is None:
            self.paths: list[Path] = []
            self.names: list[str] = list(BUILTIN_TEXTURES)
            self.description = "scikit-image bundled photos"
        else:
            folder = Path(texture_dir)
            if not folder.is_dir():
                raise ConfigError(f"texture_dir: {folder} is not a folder")
            # Recursive: DTD keeps its images in images/<class>/.
            self.paths = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
            if not self.paths:
                raise ConfigError(
                    f"texture_dir: {folder} holds no image files ({', '.join(('.png', '.jpg'))}, ...)"
                )
            self.names = [str(p) for p in self.paths]
            self.description = f"{len(self.paths)} images under {folder}"

    def __len__(self) -> int:
        return len(self.names)

    def get(self, i: int) -> np.ndarray | None:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            if self.paths:
                img = read_image(self.paths[i])
                if img.dtype == np.uint16:
                    img = (img >> 8).astype(np.uint8)
                img = to_rgb8_or_16(img, "BGR")
            else:
                img = _load_builtin(self.names[i])
        except (ImageReadError, ValueError, OSError, ImportError) as exc:
            warnings.warn(f"texture {self.names[i]} skipped: {exc}", stacklevel=2)
            return None
        self._cache[i] = img
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img
