"""Small generated image folders for ``--quick`` runs and tests (no dataset needed).

Latency does not depend on pixel content, but INT8 calibration and the end-to-end
replay need real files; these are textured "parts" so activations are not degenerate.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def _part(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), 60, dtype=np.uint8)
    c = size // 2
    cv2.circle(img, (c, c), int(size * 0.35), (int(rng.integers(150, 200)),) * 3, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], dtype=np.uint8)
    x, y = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
    cv2.circle(mask, (x, y), max(2, size // 10), 255, -1)
    out = img.copy()
    out[mask > 0] = (20, 20, 230)
    return out, mask


def make_image_folder(folder: Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """``n`` normal images in ``folder`` (created), deterministic for ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), _part(rng, size))
    return folder


def make_category(
    root: Path, n_train: int = 16, n_good: int = 4, n_defect: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """A minimal MVTec-layout category: train/good, test/{good,defect}, ground_truth/defect."""
    rng = np.random.default_rng(seed)
    make_image_folder(root / "train" / "good", n_train, size, seed)
    make_image_folder(root / "test" / "good", n_good, size, seed + 1)
    (root / "test" / "defect").mkdir(parents=True, exist_ok=True)
    (root / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
    for i in range(n_defect):
        img, mask = _defect(_part(rng, size), rng)
        cv2.imwrite(str(root / "test" / "defect" / f"{i:03d}.png"), img)
        cv2.imwrite(str(root / "ground_truth" / "defect" / f"{i:03d}_mask.png"), mask)
    return root
