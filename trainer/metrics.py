"""Anomaly detection metrics in numpy only (no torch, no scikit-learn at run time).

``roc_auc`` and ``average_precision`` match scikit-learn's ``roc_auc_score`` and
``average_precision_score`` exactly, ties included: both are computed from the counts of
positives/negatives at each distinct score. Pixel metrics use the same code on all pixels
of all images, exactly while the pixel count is below ``max_exact_pixels`` and on a
fixed 2**16-bin histogram of the scores beyond that (the result says which).

AUPRO follows MVTec's reference definition (Bergmann et al., 2021): the mean overlap of
the prediction with each connected ground-truth region (8-connectivity), as a function
of the false positive rate over all normal pixels, integrated up to FPR 0.3 and divided
by 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_MAX_EXACT_PIXELS = 1 << 25
HISTOGRAM_BINS = 1 << 16


def _as_1d(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    return y, s


def _counts_by_score(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per distinct score, highest score first."""
    _, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=inverse.max(initial=-1) + 1)
    tot = np.bincount(inverse, minlength=pos.size)
    return pos[::-1], (tot - pos)[::-1]


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from per-threshold counts (descending score); tied scores count one half."""
    p, n = float(pos.sum()), float(neg.sum())
    if p == 0 or n == 0:
        return math.nan
    pos_above = np.cumsum(pos) - pos
    return float(np.sum(neg * (pos_above + 0.5 * pos)) / (p * n))


def ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision, scikit-learn's step definition: sum (R_k - R_{k-1}) * P_k."""
    p = float(pos.sum())
    if p == 0:
        return math.nan
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    precision = tp / np.maximum(tp + fp, 1e-300)
    recall_step = pos / p
    return float(np.sum(recall_step * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (scikit-learn raises)."""
    y, s = _as_1d(labels, scores)
    if y.size == 0:
        return math.nan
    return auroc_from_counts(*_counts_by_score(y, s))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn's ``average_precision_score``; NaN without positives."""
    y, s = _as_1d(labels, scores)
    if y.size == 0:
        return math.nan
    return ap_from_counts(*_counts_by_score(y, s))


@dataclass(frozen=True)
class PixelMetrics:
    auroc: float
    ap: float
    method: str  # "exact" or "histogram(65536 bins)"
    n_pixels: int


def _histogram_counts(y: np.ndarray, s: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        idx = np.zeros(s.size, dtype=np.int64)
    else:
        idx = np.minimum(((s - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    pos = np.bincount(idx[y], minlength=bins).astype(np.float64)
    tot = np.bincount(idx, minlength=bins).astype(np.float64)
    return pos[::-1], (tot - pos)[::-1]


def pixel_metrics(
    maps: np.ndarray, masks: np.ndarray, max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS
) -> PixelMetrics:
    """Pixel AUROC and AP over stacked maps [N,H,W] (or [N,1,H,W]) and bool masks [N,H,W].

    Exact up to ``max_exact_pixels``; beyond that the scores are binned into a fixed
    histogram between their min and max (memory stays O(bins) per chunk instead of a sort
    of every pixel), which only merges scores closer than (max-min)/65536.
    """
    m = np.asarray(maps).reshape(-1)
    g = np.asarray(masks).reshape(-1).astype(bool)
    if m.size != g.size:
        raise ValueError(f"maps and masks differ in size: {np.shape(maps)} vs {np.shape(masks)}")
    if m.size <= max_exact_pixels:
        y, s = _as_1d(g, m)
        pos, neg = _counts_by_score(y, s)
        method = "exact"
    else:
        pos, neg = _histogram_counts(g, np.asarray(m, dtype=np.float32), HISTOGRAM_BINS)
        method = f"histogram({HISTOGRAM_BINS} bins)"
    return PixelMetrics(auroc_from_counts(pos, neg), ap_from_counts(pos, neg), method, int(m.size))


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions (8-connected) numbered globally across images; 0 = none."""
    out = np.zeros(masks.shape, dtype=np.int32)
    total = 0
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        if n > 1:
            out[i] = np.where(lab > 0, lab + total, 0)
            total += n - 1
    return out, total


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear (x, y) from x[0] up to x_max (x ascending)."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs.size and xs[-1] < x_max:
        j = int(np.searchsorted(x, x_max))
        if j < x.size:
            # linear interpolation of y at x_max between the last kept point and the next
            x0, x1, y0, y1 = xs[-1], x[j], ys[-1], y[j]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
            xs = np.append(xs, x_max)
            ys = np.append(ys, y_at)
    if xs.size < 2:
        return 0.0
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, from (0, 0) up, by one sort of all pixels."""
    a = np.asarray(maps, dtype=np.float32)
    g = np.asarray(masks).astype(bool)
    if a.ndim == 4:
        a = a[:, 0]
    if g.ndim == 4:
        g = g[:, 0]
    if a.shape != g.shape:
        raise ValueError(f"maps and masks differ in shape: {a.shape} vs {g.shape}")
    regions, n_regions = _regions(g)
    n_ok = int((~g).sum())
    if n_regions == 0 or n_ok == 0:
        return np.zeros(1), np.zeros(1)
    flat_r = regions.reshape(-1)
    sizes = np.bincount(flat_r, minlength=n_regions + 1).astype(np.float64)
    # Each pixel's contribution when it turns positive: 1/(region size * regions) to PRO,
    # 1/(normal pixels) to FPR. Cumulative sums over descending scores give the curve.
    pro_step = np.where(flat_r > 0, 1.0 / (sizes[flat_r] * n_regions), 0.0)
    fpr_step = np.where(flat_r > 0, 0.0, 1.0 / n_ok)
    s = a.reshape(-1)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    fpr = np.cumsum(fpr_step[order])
    pro = np.cumsum(pro_step[order])
    # one point per distinct threshold: the last pixel of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    fpr = np.r_[0.0, np.minimum(fpr[last], 1.0)]
    pro = np.r_[0.0, np.minimum(pro[last], 1.0)]
    return fpr, pro


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised to [0, 1]; NaN without regions."""
    fpr, pro = pro_curve(maps, masks)
    if fpr.size == 1:
        return math.nan
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit
