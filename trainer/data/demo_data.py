"""``pouta-demo-data``: a small inspection set in MVTec layout, made offline.

The "part surface" is a crop of one real texture photo bundled in scikit-image's wheel
(brick by default), with per-image jitter of position, lighting and sensor noise. Test
defects are drawn unlike the training-time synthesis (no Perlin masks, no pasted
textures), so a model that separates them has learned something beyond the recipe:

- ``scratch``: thin random polylines, bright or dark;
- ``spot``: irregular dark or bright blobs;
- ``crack``: dark branching random walks.

Every defect has its pixel mask under ``ground_truth/<type>/NNN_mask.png``. A fresh clone
has no ``../shared`` data, so the README demo runs on this.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from pouta.edge.contract.settings import add_config_args, settings_or_exit

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "crack")
TEXTURES: tuple[str, ...] = ("brick", "gravel", "grass")
# A warm tint makes the grey photo a colour image, so colour handling is exercised too.
_TINT = np.array([0.95, 0.80, 0.62], np.float32)  # RGB


def _texture(name: str) -> np.ndarray:
    if name not in TEXTURES:
        raise ValueError(f"texture: expected one of {list(TEXTURES)}, got {name!r}")
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    return img.astype(np.float32) / 255.0


def _good(src: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One good part: a jittered crop with lighting variation and noise, HxWx3 RGB float [0,1]."""
    crop = min(src.shape) * 3 // 8
    cy, cx = (src.shape[0] - crop) // 2, (src.shape[1] - crop) // 2
    j = crop // 10
    y0 = cy + int(rng.integers(-j, j + 1))
    x0 = cx + int(rng.integers(-j, j + 1))
    g = cv2.resize(src[y0 : y0 + crop, x0 : x0 + crop], (size, size), interpolation=cv2.INTER_AREA)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    light = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    g = g * rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03) + 0.04 * light
    g = g + rng.normal(0.0, 0.01, g.shape).astype(np.float32)
    return np.clip(g[..., None] * _TINT, 0.0, 1.0).astype(np.float32)


def _point(size: int, rng: np.random.Generator, margin: float = 0.15) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, 2)


def _scratch(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    p = _point(size, rng, 0.2)
    pts = [p]
    heading = rng.uniform(0, 2 * math.pi)
    for _ in range(int(rng.integers(2, 5))):
        heading += rng.uniform(-0.5, 0.5)
        step = rng.uniform(0.12, 0.25) * size
        p = np.clip(p + step * np.array([math.cos(heading), math.sin(heading)]), 2, size - 3)
        pts.append(p)
    thickness = max(1, round(size / 96))
    cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
    return mask


def _spot(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    c = _point(size, rng)
    r = rng.uniform(0.04, 0.08) * size
    n = 12
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    radii = r * rng.uniform(0.6, 1.3, n)
    poly = np.stack([c[0] + radii * np.cos(angles), c[1] + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    return mask


def _crack(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    step = max(1.0, size / 64)
    walkers = [(_point(size, rng, 0.25), rng.uniform(0, 2 * math.pi), int(size * 0.5 / step))]
    while walkers:
        p, heading, n = walkers.pop()
        for _ in range(n):
            heading += rng.normal(0.0, 0.35)
            q = p + step * np.array([math.cos(heading), math.sin(heading)])
            if not (1 <= q[0] < size - 1 and 1 <= q[1] < size - 1):
                break
            cv2.line(mask, tuple(np.round(p).astype(int)), tuple(np.round(q).astype(int)), 1, 1)
            p = q
            if rng.random() < 0.06 and len(walkers) < 3:
                walkers.append((p.copy(), heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), n // 2))
    return mask


_DRAW: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with a ``kind`` defect, bool mask). Dark or bright, clearly visible."""
    size = image.shape[0]
    mask = _DRAW[kind](size, rng).astype(bool)
    if kind == "spot" and rng.random() < 0.5:
        colour = np.array([0.95, 0.95, 0.85], np.float32)  # bright contamination
    elif kind == "scratch" and rng.random() < 0.5:
        colour = np.array([0.98, 0.98, 0.98], np.float32)  # bright scratch through the surface
    else:
        colour = np.array([0.05, 0.04, 0.03], np.float32)
    # Soft edge outside the mask only, so the mask is exactly where the defect is strong.
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.6)
    alpha = np.maximum(soft, mask.astype(np.float32))[..., None] * 0.9
    out = image * (1 - alpha) + colour * alpha
    return np.clip(out, 0, 1).astype(np.float32), mask


def _write(path: Path, rgb01: np.ndarray, grayscale: bool) -> None:
    u8 = np.clip(rgb01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY) if grayscale else cv2.cvtColor(u8, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write image")


def make_demo_dataset(
    out_dir: str | os.PathLike[str],
    n_train: int = 80,
    n_test_good: int = 15,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
    texture: str = "brick",
    grayscale: bool = False,
    category: str = "surface",
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write ``out_dir/<category>`` in MVTec layout and return that category folder.

    ``n_test_defect`` is per defect type. ``grayscale`` writes single-channel PNGs (a mono
    camera); readers replicate them to 3 channels.
    """
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train == 0:
        raise ValueError("demo data: n_train must be > 0 and the test counts >= 0")
    if size < 32:
        raise ValueError(f"demo data: size must be >= 32, got {size}")
    unknown = [d for d in defect_types if d not in _DRAW]
    if unknown:
        raise ValueError(f"demo data: unknown defect types {unknown}; expected {list(DEFECT_TYPES)}")
    src = _texture(texture)
    root = Path(out_dir) / category
    folders = [root / "train" / "good", root / "test" / "good"]
    folders += [root / "test" / d for d in defect_types] + [root / "ground_truth" / d for d in defect_types]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    # Separate generator streams per image: changing one count does not reshuffle the rest.
    for i in range(n_train):
        _write(
            root / "train" / "good" / f"{i:03d}.png",
            _good(src, size, np.random.default_rng([seed, 0, i])),
            grayscale,
        )
    for i in range(n_test_good):
        _write(
            root / "test" / "good" / f"{i:03d}.png",
            _good(src, size, np.random.default_rng([seed, 1, i])),
            grayscale,
        )
    for k, kind in enumerate(defect_types):
        for i in range(n_test_defect):
            rng = np.random.default_rng([seed, 2 + k, i])
            img, mask = add_defect(_good(src, size, rng), kind, rng)
            _write(root / "test" / kind / f"{i:03d}.png", img, grayscale)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    (root / "README.txt").write_text(
        f"pouta demo inspection set: crops of scikit-image's '{texture}' photo, {size}x{size}, "
        f"{'grayscale' if grayscale else 'colour'}, seed {seed}.\n"
        f"train/good: {n_train}; test/good: {n_test_good}; "
        f"test/<{'|'.join(defect_types)}>: {n_test_defect} each, masks in ground_truth/.\n"
        "Made by pouta-demo-data (pouta.trainer.data.demo_data).\n"
    )
    return root


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pouta-demo-data",
        description="Write a small MVTec-layout inspection set (with masks) cut from scikit-image's texture photos.",
    )
    ap.add_argument(
        "--out", default="demo/data", help="output folder (the category folder is created inside)"
    )
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--n-test-good", type=int, default=15)
    ap.add_argument("--n-test-defect", type=int, default=10, help="per defect type")
    ap.add_argument("--size", type=int, default=128, help="square image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texture", choices=TEXTURES, default="brick")
    ap.add_argument("--grayscale", action="store_true", help="single-channel images (mono camera)")
    ap.add_argument("--category", default="surface")
    add_config_args(ap, config_file=True)
    args = ap.parse_args(argv)
    settings_or_exit(ap, args)
    try:
        root = make_demo_dataset(
            args.out,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            size=args.size,
            seed=args.seed,
            texture=args.texture,
            grayscale=args.grayscale,
            category=args.category,
        )
    except (ValueError, OSError) as exc:
        print(f"pouta-demo-data: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
