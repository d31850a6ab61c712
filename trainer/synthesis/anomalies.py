"""Training-time anomaly synthesis (DRAEM recipe, as POUTA uses it).

A Perlin-noise map at random scales, rotated and thresholded, is the anomaly mask M.
The anomaly source is a texture photo (a texture folder such as DTD, or the real photos
bundled in scikit-image's wheel) after 3 random photometric augmentations, optionally
fused with a translated/rotated copy of the image itself (the POUTA paper), pasted with
an opacity factor beta ~ U(0, beta_max):

    out = img * (1 - M) + (1 - beta) * src * M + beta * img * M

A share ``1 - anomaly_prob`` of samples stays normal (M = 0, image unchanged).

Every random choice is drawn from the ``np.random.Generator`` passed in, so a sample is a
pure function of that generator's seed. ``TrainingSet`` seeds it with (seed, epoch,
index): batches are reproducible after a resume and independent of DataLoader workers.
``pouta.trainer.data.training_set.TrainingSet`` (which needs torch) serves the samples.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pouta.edge.contract.errors import ConfigError

from .augment import AUGMENTS, rotate_image
from .defect_modes import MODES
from .textures import TextureSource

log = logging.getLogger(__name__)


@dataclass
class SynthesisConfig:
    anomaly_prob: float = 0.5
    # Perlin grid resolution per axis is 2**randint(min, max) (max exclusive, as DRAEM).
    perlin_min_scale: int = 0
    perlin_max_scale: int = 6
    threshold: float = 0.5
    rotate_mask: float = 90.0  # mask noise rotated by U(-r, r) degrees
    beta_max: float = 0.8
    texture_dir: str | None = None
    n_augment: int = 3  # photometric augmentations applied to the texture, of the 10 below
    # Fuse the texture with a translated/rotated/identity copy of the image (paper):
    # src = w * texture + (1 - w) * transformed_image, w ~ U(fuse_weight).
    fuse_prob: float = 0.5
    fuse_weight: tuple[float, float] = (0.3, 0.7)
    max_translate: float = 0.25  # fraction of the image size
    # DRAEM also rotates the *original* (and so the target) by U(-90, 90) for 30% of samples;
    # harmful for parts with a fixed orientation, so off unless asked for.
    rotate_original_prob: float = 0.0
    texture_crop: tuple[float, float] = (0.5, 1.0)  # random crop side, fraction of the texture's short side
    texture_cache: int = 256  # decoded textures kept per process
    # How an anomalous sample is made: relative weights of DRAEM's Perlin+texture recipe
    # ("perlin") and the line-defect modes of ``defect_modes`` (thin strokes, small spots,
    # uneven brightness, cut-paste); a weight of 0 turns a mode off. DRAEM alone by
    # default: mixed in at 60% the line-defect modes ranked images worse on all four real
    # categories measured at equal budget (README, quality).
    modes: dict[str, float] = field(
        default_factory=lambda: {"perlin": 1.0, "stroke": 0.0, "spot": 0.0, "uneven": 0.0, "cutpaste": 0.0}
    )

    def validate(self) -> None:
        if not 0.0 <= self.anomaly_prob <= 1.0:
            raise ConfigError(f"synthesis.anomaly_prob: expected a value in [0, 1], got {self.anomaly_prob}")
        if not 0 <= self.perlin_min_scale < self.perlin_max_scale:
            raise ConfigError(
                "synthesis.perlin_min_scale/perlin_max_scale: expected 0 <= min < max, got "
                f"{self.perlin_min_scale}/{self.perlin_max_scale}"
            )
        if not 0.0 <= self.beta_max < 1.0:
            raise ConfigError(f"synthesis.beta_max: expected a value in [0, 1), got {self.beta_max}")
        if not 1 <= self.n_augment <= len(AUGMENTS):
            raise ConfigError(f"synthesis.n_augment: expected 1..{len(AUGMENTS)}, got {self.n_augment}")
        known = {"perlin", *MODES}
        unknown = sorted(set(self.modes) - known)
        if unknown:
            raise ConfigError(
                f"synthesis.modes.{unknown[0]}: unknown mode (known: {', '.join(sorted(known))})"
            )
        weights = list(self.modes.values())
        if any(not isinstance(v, int | float) or v < 0 for v in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"synthesis.modes: expected non-negative weights with a positive sum, got {self.modes}"
            )
        if self.texture_dir is not None and not Path(self.texture_dir).is_dir():
            raise ConfigError(f"synthesis.texture_dir: {self.texture_dir} is not a folder")


# ---------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` lattice cells per axis; any image size.

    Values lie roughly in [-1, 1] (scaled by sqrt(2) as DRAEM's implementation).
    """
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    uy = np.arange(h, dtype=np.float64) * (ry / h)
    ux = np.arange(w, dtype=np.float64) * (rx / w)
    iy = np.floor(uy).astype(np.int64)
    ix = np.floor(ux).astype(np.int64)
    fy = (uy - iy)[:, None]
    fx = (ux - ix)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grads[(iy + oy)[:, None], (ix + ox)[None, :]]
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    ty, tx = _fade(fy), _fade(fx)
    n0 = dot(0, 0) * (1 - tx) + dot(0, 1) * tx
    n1 = dot(1, 0) * (1 - tx) + dot(1, 1) * tx
    return (math.sqrt(2.0) * (n0 * (1 - ty) + n1 * ty)).astype(np.float32)


# ------------------------------------------------------------------ synthesis

# A labelled synthetic-defect pixel must change by at least one grey level: only pixels a
# blend left as they were lose their label (DRAEM's subtle, low-contrast ones stay).
VISIBLE_CHANGE = 1.0 / 255.0


class AnomalySynthesizer:
    def __init__(self, cfg: SynthesisConfig, height: int, width: int) -> None:
        cfg.validate()
        self.cfg = cfg
        self.height = int(height)
        self.width = int(width)
        self.textures = TextureSource(cfg.texture_dir, cfg.texture_cache)

    # --- pieces, each a pure function of the generator state

    def perlin_mask(self, rng: np.random.Generator) -> np.ndarray:
        """Binary float32 [H,W] mask with at least one pixel set."""
        c = self.cfg
        noise = np.zeros((self.height, self.width), dtype=np.float32)
        for _ in range(16):
            ry = 2 ** int(rng.integers(c.perlin_min_scale, c.perlin_max_scale))
            rx = 2 ** int(rng.integers(c.perlin_min_scale, c.perlin_max_scale))
            noise = perlin_noise((self.height, self.width), (ry, rx), rng)
            if c.rotate_mask:
                noise = rotate_image(noise, rng.uniform(-c.rotate_mask, c.rotate_mask))
            mask = (noise > c.threshold).astype(np.float32)
            if mask.any():
                return mask
        # Vanishingly rare with the defaults; keep the strongest 5% so has_anomaly holds.
        return (noise >= np.quantile(noise, 0.95)).astype(np.float32)

    def texture(self, rng: np.random.Generator) -> np.ndarray:
        """A random texture crop at model size after ``n_augment`` photometric augmentations."""
        c = self.cfg
        img = None
        for _ in range(8):
            img = self.textures.get(int(rng.integers(len(self.textures))))
            if img is not None:
                break
        if img is None:
            raise ConfigError(f"synthesis: no readable texture in {self.textures.description}")
        th, tw = img.shape[:2]
        side = max(8, int(min(th, tw) * rng.uniform(*c.texture_crop)))
        ch, cw = min(side, th), min(side, tw)
        y0 = int(rng.integers(0, th - ch + 1))
        x0 = int(rng.integers(0, tw - cw + 1))
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        tex = cv2.resize(crop, (self.width, self.height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        tex /= 255.0
        for k in rng.choice(len(AUGMENTS), size=c.n_augment, replace=False):
            # Clip after each step: gamma of a negative value is NaN.
            tex = np.clip(AUGMENTS[int(k)](tex, rng), 0.0, 1.0).astype(np.float32)
        return tex

    def transformed_copy(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The image translated, rotated or unchanged (one of three, equally likely)."""
        kind = int(rng.integers(3))
        if kind == 0:
            return image
        h, w = image.shape[:2]
        if kind == 1:
            t = self.cfg.max_translate
            dx, dy = rng.uniform(-t, t) * w, rng.uniform(-t, t) * h
            m = np.float32([[1, 0, dx], [0, 1, dy]])
            return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
        return rotate_image(image, rng.uniform(-90, 90))

    def __call__(
        self,
        image_hwc_rgb01: np.ndarray,
        rng: np.random.Generator,
        force_anomaly: bool | None = None,
        force_mode: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """(augmented [H,W,3] float32 in [0,1], mask [H,W] float32 {0,1}, has_anomaly).

        ``force_anomaly`` overrides the ``anomaly_prob`` draw (grids, tests); the draw is
        still consumed so the rest of the stream does not shift.
        """
        img = np.asarray(image_hwc_rgb01, dtype=np.float32)
        if img.shape != (self.height, self.width, 3):
            raise ValueError(
                f"synthesis: expected an image of shape {(self.height, self.width, 3)}, got {img.shape}"
            )
        c = self.cfg
        draw = rng.random() < c.anomaly_prob
        anomalous = draw if force_anomaly is None else force_anomaly
        if not anomalous:
            return img.copy(), np.zeros((self.height, self.width), dtype=np.float32), False
        mode = self.pick_mode(rng)
        mode = force_mode or mode
        if mode != "perlin":
            out, mask, has = self._labelled(img, *MODES[mode](img, rng))
            if has:
                return out, mask, True
        return self._labelled(img, *self.perlin(img, rng))

    @staticmethod
    def _labelled(img: np.ndarray, out: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Label only what visibly changed, and change nothing outside the label.

        A stroke brightened on a saturated highlight, or a patch pasted onto its twin,
        leaves pixels as they were; labelling those would teach the model that normal
        bright (or dark, or repeated) areas are defects. Pixels outside the label stay
        bit-identical, so the model never learns that a changed pixel is normal.
        """
        label = (mask > 0) & (np.abs(out - img).max(axis=-1) > VISIBLE_CHANGE)
        if not label.any():
            return img.copy(), np.zeros(mask.shape, np.float32), False
        return np.where(label[..., None], out, img).astype(np.float32), label.astype(np.float32), True

    def pick_mode(self, rng: np.random.Generator) -> str:
        # Sorted: the draw must not depend on the order the modes were written in (YAML, --set).
        names = sorted(self.cfg.modes)
        weights = np.array([self.cfg.modes[n] for n in names], dtype=np.float64)
        return names[int(rng.choice(len(names), p=weights / weights.sum()))]

    def perlin(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """DRAEM's recipe: a Perlin-noise mask filled with a (fused) augmented texture."""
        c = self.cfg
        mask = self.perlin_mask(rng)
        src = self.texture(rng)
        if rng.random() < c.fuse_prob:
            w = rng.uniform(*c.fuse_weight)
            src = w * src + (1.0 - w) * self.transformed_copy(img, rng)
        beta = np.float32(rng.uniform(0.0, c.beta_max))
        m = mask[..., None]
        out = img * (1.0 - m) + (1.0 - beta) * src * m + beta * img * m
        # The blend of two [0,1] images stays in [0,1]; clip only float noise.
        return np.clip(out, 0.0, 1.0).astype(np.float32), mask

    def save_grid(
        self,
        images: Sequence[np.ndarray],
        path: str | os.PathLike[str],
        seed: int = 0,
        n: int = 16,
        mode: str | None = None,
    ) -> Path:
        """PNG grid of ``n`` synthesized anomalies (each: augmented image | its mask).

        ``images`` are [H,W,3] or [3,H,W] RGB float in [0,1] at model size. Every cell is
        anomalous, because the grid is for checking what the anomalies look like; with
        ``mode`` every cell is made by that mode (``perlin`` or one of ``defect_modes``).
        """
        if not images:
            raise ValueError("save_grid: no images given")
        cells = []
        for k in range(n):
            img = np.asarray(images[k % len(images)], dtype=np.float32)
            if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
                img = img.transpose(1, 2, 0)
            aug, mask, _ = self(img, np.random.default_rng([seed, k]), force_anomaly=True, force_mode=mode)
            mask_rgb = np.repeat(mask[..., None], 3, axis=-1)
            sep = np.ones((self.height, 2, 3), np.float32)
            cells.append(np.concatenate([aug, sep, mask_rgb], axis=1))
        cols = min(4, n)
        rows = math.ceil(n / cols)
        ch, cw = cells[0].shape[:2]
        pad = 4
        grid = np.ones((rows * (ch + pad) + pad, cols * (cw + pad) + pad, 3), np.float32) * 0.5
        for k, cell in enumerate(cells):
            r, col = divmod(k, cols)
            y, x = pad + r * (ch + pad), pad + col * (cw + pad)
            grid[y : y + ch, x : x + cw] = cell
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(out), bgr):
            raise OSError(f"{out}: could not write the synthesis grid PNG")
        return out
