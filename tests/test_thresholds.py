"""Threshold rules on synthetic score lists, and the score histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pouta.calibration.errors import CalibrationError
from pouta.calibration.plots import save_score_histogram
from pouta.calibration.thresholds import PixelHistogram, calibrate_thresholds, image_threshold


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


def test_histogram_png_written(tmp_path: Path) -> None:
    out = save_score_histogram(tmp_path / "h.png", [0.1, 0.2, 0.25], 0.3, [0.7, 0.9], title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
