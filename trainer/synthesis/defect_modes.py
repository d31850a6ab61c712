"""Synthetic defects that real lines have and DRAEM's Perlin blobs do not teach.

Each mode is a pure function of (image, generator): it returns the defective image and
its mask, both at the image's size. ``AnomalySynthesizer`` mixes them with the DRAEM
recipe (``SynthesisConfig.modes`` gives the weights):

- ``stroke``: thin curvilinear scratches and cracks, 1-6 px wide, darker or brighter
  than the surface, along random quadratic Bezier curves or jagged polylines;
- ``spot``: a few small pits or spots, 1-6 px radius, dark or bright;
- ``uneven``: a large, low-contrast region of changed brightness or colour (stains,
  uneven lighting of one area), soft-edged; the mask is its core;
- ``cutpaste``: a patch of the same image (flipped or rotated) pasted elsewhere,
  as a rectangle or a long thin scar.

The demo data set draws its defects with other code (``demo_data``), so the demo stays
an honest test of what training learnt.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Mode = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
LABEL_LEVEL = 0.2  # a soft-edged defect is labelled where it is at least this strong


def _tone(
    img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, strength: tuple[float, float]
) -> np.ndarray:
    """Darken or brighten ``img`` where ``mask`` (soft, [H,W] in [0,1]) is set.

    On a bright surface the defect is darker, on a dark one brighter, else either: a
    brightened white (or darkened black) region would not change at all.
    """
    m = mask[..., None]
    amount = rng.uniform(*strength)
    level = float(img[mask > 0.5].mean()) if (mask > 0.5).any() else 0.5
    draw = rng.random()
    darker = level > 0.7 or (level >= 0.3 and draw < 0.5)
    # Darker (towards black, keeping some texture) or brighter (towards white).
    target = img * (1.0 - amount) if darker else img + (1.0 - img) * amount
    return np.clip(img * (1.0 - m) + target * m, 0.0, 1.0).astype(np.float32)


def _soften(mask: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(mask, (0, 0), 0.7)


def _curve_points(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    length = rng.uniform(0.15, 0.7) * max(h, w)
    p0 = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    angle = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
    if rng.random() < 0.5:  # smooth scratch: quadratic Bezier
        bend = rng.normal(0, 0.3) * length
        mid = (p0 + p2) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
        t = np.linspace(0, 1, 48)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p2
    else:  # crack: jagged polyline with small random turns
        n = int(rng.integers(6, 16))
        steps = length / n
        heading = angle
        pts = [p0]
        for _ in range(n):
            heading += rng.normal(0, 0.5)
            pts.append(pts[-1] + steps * np.array([np.cos(heading), np.sin(heading)]))
        pts = np.array(pts)
    return pts


def stroke(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        pts = _curve_points(h, w, rng)
        thickness = int(rng.integers(1, 6))
        cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA)
        if rng.random() < 0.3:  # a branch, as cracks have
            k = int(rng.integers(1, len(pts)))
            branch = _curve_points(h, w, rng) * 0.5
            branch += pts[k] - branch[0]
            cv2.polylines(
                mask, [np.round(branch).astype(np.int32)], False, 1.0, max(1, thickness - 1), cv2.LINE_AA
            )
    soft = _soften(np.clip(mask, 0, 1))
    return _tone(img, soft, rng, (0.35, 0.9)), (soft > LABEL_LEVEL).astype(np.float32)


def spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 6))):
        c = (int(rng.uniform(0.05, 0.95) * w), int(rng.uniform(0.05, 0.95) * h))
        axes = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        cv2.ellipse(mask, c, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    soft = _soften(np.clip(mask, 0, 1))
    return _tone(img, soft, rng, (0.4, 0.95)), (soft > LABEL_LEVEL).astype(np.float32)


def uneven(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    blob = np.zeros((h, w), np.float32)
    c = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
    axes = (int(rng.uniform(0.12, 0.4) * w), int(rng.uniform(0.12, 0.4) * h))
    cv2.ellipse(blob, c, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    soft = cv2.GaussianBlur(blob, (0, 0), 0.12 * min(h, w))
    soft /= max(float(soft.max()), 1e-6)
    # The change fades in from the edge of the labelled region, so nothing outside it changes.
    weight = np.clip((soft - 0.3) / 0.7, 0.0, 1.0)
    gain = rng.uniform(0.15, 0.4) * (1 if rng.random() < 0.5 else -1)
    colour = float(np.abs(img - img.mean(axis=-1, keepdims=True)).max()) > 1e-3
    # A slight colour cast on colour parts; a gray part stays gray.
    tint = 1.0 + gain * (rng.uniform(0.6, 1.0, size=3) if colour else np.ones(3)).astype(np.float32)
    out = img * (1.0 + (tint - 1.0) * weight[..., None])
    return np.clip(out, 0.0, 1.0).astype(np.float32), (weight > 0).astype(np.float32)


def cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    if rng.random() < 0.5:  # rectangle
        ph, pw = int(rng.uniform(0.08, 0.3) * h), int(rng.uniform(0.08, 0.3) * w)
    else:  # scar: long and thin
        ph, pw = int(rng.integers(2, 7)), int(rng.uniform(0.2, 0.5) * w)
        if rng.random() < 0.5:
            ph, pw = min(h - 1, pw), ph
    ph, pw = max(2, min(ph, h - 1)), max(2, min(pw, w - 1))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = img[sy : sy + ph, sx : sx + pw].copy()
    if rng.random() < 0.5:
        patch = patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
    patch = np.clip(patch * rng.uniform(0.85, 1.15), 0, 1)
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = img.copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((h, w), np.float32)
    mask[ty : ty + ph, tx : tx + pw] = 1.0  # the synthesizer keeps only what visibly changed
    return out.astype(np.float32), mask


MODES: dict[str, Mode] = {"stroke": stroke, "spot": spot, "uneven": uneven, "cutpaste": cutpaste}
