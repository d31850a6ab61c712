"""Threshold rules on synthetic score lists, and the score histogram."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.calibration.errors import CalibrationError
from pouta.calibration.thresholds.plots import save_score_histogram
from pouta.calibration.thresholds.rules import PixelHistogram, calibrate_thresholds, image_threshold


def test_normal_max_margin() -> None:
    thr, params = image_threshold("normal-max-margin", [0.1, 0.2, 0.3], margin=1.5)
    assert thr == pytest.approx(0.45) and params == {"margin": 1.5}


def test_normal_max_margin_caps_below_one() -> None:
    thr, params = image_threshold("normal-max-margin", [0.5, 0.9], margin=1.2)
    assert thr == pytest.approx(0.95) and params["capped_below"] == 1.0


def test_normal_quantile_plain_and_iqr() -> None:
    s = np.arange(101) / 100.0
    assert image_threshold("normal-quantile", s, quantile=0.9)[0] == pytest.approx(0.9)
    thr, params = image_threshold("normal-quantile", s, quantile=0.75, iqr_k=1.5)
    assert thr == pytest.approx(0.75 + 1.5 * 0.5) and params == {"quantile": 0.75, "iqr_k": 1.5}


def test_f1_optimal_separates_and_prefers_the_lower_threshold() -> None:
    thr, params = image_threshold("f1-optimal", [0.1, 0.2, 0.3], [0.7, 0.8])
    assert thr == pytest.approx(0.5) and params["f1"] == 1.0
    thr, params = image_threshold("f1-optimal", [0.1, 0.6], [0.5, 0.9])
    assert params["f1"] == pytest.approx(0.8) and thr < 0.5


def test_f1_on_all_normal_set_is_refused_with_a_reason() -> None:
    with pytest.raises(CalibrationError, match="needs defect images.*flags every part"):
        image_threshold("f1-optimal", [0.1, 0.2], [])


@pytest.mark.parametrize(
    ("rule", "kwargs", "match"),
    [
        ("bogus", {}, "unknown"),
        ("normal-max-margin", {"margin": 0.5}, "margin"),
        ("normal-quantile", {"quantile": 1.5}, "quantile"),
    ],
)
def test_bad_rules_and_params(rule: str, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        image_threshold(rule, [0.1, 0.2], **kwargs)


def test_nan_scores_refused() -> None:
    with pytest.raises(CalibrationError, match="NaN"):
        image_threshold("normal-max-margin", [0.1, float("nan")])


def test_calibrate_thresholds_records_evidence() -> None:
    hist = PixelHistogram()
    hist.add(np.linspace(0.0, 0.5, 10_000))
    t = calibrate_thresholds(
        [0.1, 0.2, 0.3], [0.8], hist, rule="normal-quantile", quantile=1.0, scored_with="m.onnx"
    )
    assert t.image == pytest.approx(0.3) and t.n_normal == 3 and t.n_defect == 1
    assert t.pixel == pytest.approx(0.5, abs=1e-3) and t.params["pixel_rule"] == "normal-quantile"
    assert t.normal_score_stats["max"] == pytest.approx(0.3) and t.defect_score_stats["n"] == 1
    assert t.scored_with == "m.onnx"
    fixed = calibrate_thresholds([0.1], None, None)  # no maps -> fixed pixel rule, recorded
    assert fixed.params["pixel_rule"] == "fixed" and fixed.defect_score_stats == {}


def _dashed_line_x(png: Path) -> list[int]:
    """Columns of the plot area crossed by a long black dashed line (not the solid frame)."""
    img = cv2.imread(str(png))
    dark = (img.max(axis=2) < 60).sum(axis=0)
    frame = np.flatnonzero(dark > 0.6 * img.shape[0])  # left and right axis spines, solid
    inside = np.arange(img.shape[1])[frame.min() + 3 : frame.max() - 2]
    return [int(x) for x in inside if 0.25 * img.shape[0] < dark[x] < 0.6 * img.shape[0]]


def _has_red_bars(png: Path) -> bool:
    b, g, r = (cv2.imread(str(png)).astype(int)[..., i] for i in range(3))
    return bool(((r > 200) & (g < 160) & (b < 160)).sum() > 200)


def test_histogram_draws_defects_and_the_threshold_where_they_are(tmp_path: Path) -> None:
    normal, defect = [0.1, 0.2, 0.25], [0.7, 0.9]
    low = save_score_histogram(tmp_path / "low.png", normal, 0.3, defect, title="t")
    high = save_score_histogram(tmp_path / "high.png", normal, 0.6, defect, title="t")
    bare = save_score_histogram(tmp_path / "bare.png", normal, None)
    assert cv2.imread(str(low)).shape[:2] == (400, 700)
    # The threshold is one dashed vertical line, further right for a higher threshold.
    x_low, x_high = _dashed_line_x(low), _dashed_line_x(high)
    assert x_low and x_high and max(x_low) - min(x_low) <= 3 and max(x_high) - min(x_high) <= 3
    assert min(x_high) > max(x_low) + 100
    assert _dashed_line_x(bare) == []  # threshold None: no line
    # Defect scores are drawn (red bars) only when given.
    assert _has_red_bars(low) and not _has_red_bars(bare)
