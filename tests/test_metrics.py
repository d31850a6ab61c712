"""Metrics against scikit-learn and against a straightforward AUPRO reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pouta.trainer.metrics import (
    aupro,
    average_precision,
    pixel_metrics,
    pro_curve,
    roc_auc,
)

sk = pytest.importorskip("sklearn.metrics")
ndimage = pytest.importorskip("scipy.ndimage")


def test_known_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333333)
    # a full tie is chance level
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.0, 0.1, 0.9]) == 1.0
    assert roc_auc([1, 1, 0], [0.0, 0.1, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert math.isnan(average_precision([0, 0], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[0], y[1] = True, False
    # coarse rounding produces many ties
    s = np.round(rng.random(n) + 0.6 * y, int(rng.integers(0, 3)))
    assert roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_pixel_metrics_exact_and_histogram() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), bool)
    masks[1, 5:12, 5:15] = True
    masks[3, 20:30, 2:9] = True
    maps = rng.random((4, 1, 32, 32)).astype(np.float32) * 0.7 + 0.3 * masks[:, None]
    exact = pixel_metrics(maps, masks)
    assert exact.method == "exact" and exact.n_pixels == masks.size
    assert exact.auroc == pytest.approx(sk.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert exact.ap == pytest.approx(sk.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    approx = pixel_metrics(maps, masks, max_exact_pixels=100)
    assert approx.method.startswith("histogram")
    assert approx.auroc == pytest.approx(exact.auroc, abs=1e-3)
    assert approx.ap == pytest.approx(exact.ap, abs=1e-3)


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Threshold sweep: every distinct score, per-region overlap and FPR computed directly."""
    labeled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, lab == k) for i, lab in enumerate(labeled) for k in range(1, lab.max() + 1)]
    normal = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        pts.append((fpr, pro))
    fpr, pro = np.array(pts).T
    # integrate up to the limit, interpolating the crossing point
    area = 0.0
    for k in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 12:18, 10:13] = True  # two regions in one image, different sizes
    masks[2, 8:10, 8:18] = True
    maps = np.round(rng.random(masks.shape) * 0.8 + 0.4 * masks, 2)  # ties
    ours = aupro(maps, masks)
    assert ours == pytest.approx(_reference_aupro(maps, masks), abs=1e-9)
    assert 0.0 < ours < 1.0


def test_aupro_extremes() -> None:
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 3:8, 3:8] = True
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(aupro(perfect, np.zeros_like(masks)))
    fpr, pro = pro_curve(perfect[:, None], masks[:, None])
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
