"""Heatmap colouring and blending: the one implementation used by the runtime's overlay
images, evaluation reports and calibration pictures."""

from __future__ import annotations

import cv2
import numpy as np

from ..postprocess import NG
from .preprocess import to_rgb8_or_16


def to_bgr8(image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
    """Any supported image (gray, BGR, BGRA, RGB; uint8/uint16/float [0,1]) -> BGR uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = to_rgb8_or_16(image, color_order)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def as_stored(image: np.ndarray, color_order: str = "BGR") -> np.ndarray:
    """A frame as a PNG keeps it: 16-bit mono stays 16-bit (the frame the model judged);
    colour and float frames become BGR uint8."""
    if image.ndim == 3 or image.dtype.kind == "f":
        return to_bgr8(image, color_order)
    return image


def colorize(amap: np.ndarray, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Anomaly map [H,W] (or [1,H,W]) -> BGR uint8 heatmap (blue = normal, red = anomalous).

    A fixed [vmin, vmax] scale (not per-image min/max) so that a good part stays blue
    instead of having its noise stretched to full red.
    """
    a = np.asarray(amap, dtype=np.float32).squeeze()
    if a.ndim != 2:
        raise ValueError(f"anomaly map: expected [H,W] or [1,H,W], got shape {np.shape(amap)}")
    span = max(vmax - vmin, 1e-12)
    u8 = np.clip((a - vmin) * (255.0 / span) + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_JET)


def _map_like(amap: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Anomaly map as float32 [H,W] at the image's size (bilinear when sizes differ)."""
    a = np.asarray(amap, dtype=np.float32).squeeze()
    if a.shape != image.shape[:2]:
        a = cv2.resize(a, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return a


def blend(
    image_bgr: np.ndarray,
    amap: np.ndarray,
    alpha: float = 0.45,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> np.ndarray:
    """Heatmap blended over the image; the map is resized to the image when sizes differ."""
    base = to_bgr8(image_bgr)
    heat = colorize(_map_like(amap, base), vmin, vmax)
    return cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0.0)


def draw_overlay(
    image: np.ndarray,
    amap_source: np.ndarray,
    verdict: str,
    score: float,
    pixel_threshold: float,
    color_order: str = "BGR",
    alpha: float = 0.45,
    label: list[str] | None = None,
) -> np.ndarray:
    """Operator picture: heatmap blended over the part, defect contours, verdict text.

    ``amap_source`` is the anomaly map already mapped to the image size
    (``FrameGeometry.to_source``), so contours follow source pixels. ``label``: text
    lines drawn large in the top-left corner instead of ``"<verdict> <score>"`` (the
    runtime passes verdict, normalised score, sequence number and UTC time).
    """
    base = to_bgr8(image, color_order)
    a = _map_like(amap_source, base)
    # Tint only where the map approaches the pixel threshold: an operator must still see
    # the part itself, and a good part's low-level map noise would otherwise wash the
    # whole picture blue. Colours run from the threshold (blue-green) to 4x it (red), a
    # fixed per-model scale so pictures of different parts compare.
    thr = max(float(pixel_threshold), 1e-6)
    heat = colorize(a, 0.0, min(1.0, 4.0 * thr))
    weight = alpha * np.clip((a - 0.5 * thr) / (0.5 * thr), 0.0, 1.0)[..., None]
    out = (base.astype(np.float32) * (1.0 - weight) + heat.astype(np.float32) * weight + 0.5).astype(np.uint8)
    mask = (a > pixel_threshold).astype(np.uint8)
    if mask.any():
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, out.shape[1] // 400))
    color = (0, 0, 255) if verdict == NG else (0, 200, 0)
    lines = label or [f"{verdict} {score:.3f}"]
    # Sized so the longest line spans about half the picture, readable on a line-side
    # screen at any camera resolution, but the lines together never cover more than
    # about a third of its height (wide line-scan and fabric frames).
    longest = max(lines, key=len)
    (w1, _), _ = cv2.getTextSize(longest, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 2)
    scale = max(0.35, min(0.5 * out.shape[1] / max(w1, 1), 0.35 * out.shape[0] / (30 * len(lines))))
    thick = max(1, round(scale * 2))
    x = max(4, out.shape[1] // 100)
    step = round(30 * scale)
    for i, text in enumerate(lines):
        org = (x, max(12, step * (i + 1)))
        # Dark outline first so the text stays readable on any heatmap colour.
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    return out
