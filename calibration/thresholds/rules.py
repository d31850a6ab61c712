"""Threshold rules: the one place that turns calibration scores into pass/fail limits.

Image threshold (score > threshold -> NG):

- ``normal-max-margin``: ``max(normal scores) * margin``. Needs normal images only.
- ``normal-quantile``: ``quantile(normal, q) + k * IQR(normal)``; ``k = 0`` is the plain
  quantile, ``q = 0.75, k = 1.5`` the Tukey fence. Normal images only.
- ``f1-optimal``: the threshold that maximises F1 of the defect class, which needs defect
  images. On an all-normal set F1 is 0 for every threshold and tools that still "optimise"
  it end up flagging everything (a known complaint), so it is refused here.
- ``target-false-reject`` (``--target-false-reject P --confidence C``): the line's own
  currency. With n good scores sorted ascending, the threshold is the (n - j)-th of them,
  where j is the largest count with P(Binomial(n, P) <= j) <= 1 - C. The true false-reject
  rate of that order statistic exceeds P exactly when Binomial(n, P) <= j (the good parts'
  score CDF at the threshold is the (n - j)-th uniform order statistic), so
  P(false-reject rate > P) <= 1 - C for every continuous score distribution; ties only make
  it more conservative. No fitted tail, so no shape to get wrong; the price is n: j = 0
  (the maximum) needs (1 - P)^n <= 1 - C, and fewer good parts are refused with the count
  needed. ``bound`` is the smallest rate the chosen rank still guarantees (<= P).
- ``target-escape`` (``--target-escape Q``): the same rule mirrored on defect scores (m
  of them): at most j defects may lie at or below the threshold, which sits just below the
  (j + 1)-th smallest defect score, so P(escape rate > Q) <= 1 - C.

Pixel threshold (map value > threshold -> defect pixel): a high quantile of all pixel
values of the normal anomaly maps (``normal-quantile``), or a ``fixed`` value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pouta.edge.contract.metadata import Thresholds

from ..errors import CalibrationError
from .binomial import allowed_exceedances, min_parts, upper_bound

TARGET_RULES = ("target-false-reject", "target-escape")
IMAGE_RULES = ("normal-max-margin", "normal-quantile", "f1-optimal", *TARGET_RULES)
PIXEL_RULES = ("normal-quantile", "fixed")
DEFAULT_IMAGE_RULE = "normal-max-margin"
DEFAULT_MARGIN = 1.1
DEFAULT_QUANTILE = 0.99
DEFAULT_IQR_K = 0.0
DEFAULT_CONFIDENCE = 0.95
DEFAULT_PIXEL_QUANTILE = 0.999
DEFAULT_PIXEL_FIXED = 0.5
# Contract scores and maps are probabilities: a threshold at or above 1 never fires.
SCORE_UPPER_BOUND = 1.0


def score_stats(scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {}
    q = np.quantile(s, [0.25, 0.5, 0.75, 0.95, 0.99])
    return {
        "n": float(s.size),
        "min": float(s.min()),
        "max": float(s.max()),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "p25": float(q[0]),
        "p50": float(q[1]),
        "p75": float(q[2]),
        "p95": float(q[3]),
        "p99": float(q[4]),
    }


def image_threshold(
    rule: str,
    normal: Sequence[float] | np.ndarray,
    defect: Sequence[float] | np.ndarray | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    quantile: float = DEFAULT_QUANTILE,
    iqr_k: float = DEFAULT_IQR_K,
    target: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, dict[str, Any]]:
    """(threshold, params actually used) for one image rule."""
    n = np.asarray(normal, dtype=np.float64)
    d = np.asarray(defect if defect is not None else [], dtype=np.float64)
    if n.size == 0:
        raise CalibrationError(f"threshold rule {rule!r}: no normal scores to calibrate on")
    if not np.all(np.isfinite(n)) or not np.all(np.isfinite(d)):
        raise CalibrationError(f"threshold rule {rule!r}: scores contain NaN/inf (broken model or artifact)")
    if rule == "normal-max-margin":
        if margin < 1.0:
            raise CalibrationError(f"normal-max-margin: margin must be >= 1, got {margin}")
        top = float(n.max())
        thr = top * margin
        params: dict[str, Any] = {"margin": margin}
        if thr >= SCORE_UPPER_BOUND > top:
            # A threshold the score can never exceed would pass every part; split the
            # remaining headroom instead, and say so in the metadata.
            thr = top + (SCORE_UPPER_BOUND - top) / 2.0
            params["capped_below"] = SCORE_UPPER_BOUND
        return thr, params
    if rule == "normal-quantile":
        if not 0.0 < quantile <= 1.0:
            raise CalibrationError(f"normal-quantile: quantile must lie in (0, 1], got {quantile}")
        if iqr_k < 0:
            raise CalibrationError(f"normal-quantile: iqr_k must be >= 0, got {iqr_k}")
        q25, q75, qq = np.quantile(n, [0.25, 0.75, quantile])
        return float(qq + iqr_k * (q75 - q25)), {"quantile": quantile, "iqr_k": iqr_k}
    if rule == "f1-optimal":
        if d.size == 0:
            raise CalibrationError(
                "f1-optimal needs defect images (--defects DIR): on an all-normal set F1 is 0 at every "
                "threshold and the 'optimum' flags every part; use normal-max-margin or normal-quantile"
            )
        thr, f1 = _f1_optimal(n, d)
        return thr, {"f1": f1}
    if rule in TARGET_RULES:
        if target is None:
            flag = "--" + rule
            raise CalibrationError(f"threshold rule {rule!r} needs a target rate ({flag} P, e.g. 0.005)")
        if rule == "target-false-reject":
            return false_reject_threshold(n, target, confidence)
        if d.size == 0:
            raise CalibrationError(
                "--target-escape needs labelled defect images (--defects DIR, or --holdout DIR with a "
                "good/ subfolder and one folder per defect type)"
            )
        return escape_threshold(d, target, confidence)
    raise CalibrationError(f"threshold rule {rule!r} is unknown, expected one of {IMAGE_RULES}")


def check_target(target: float, confidence: float, flag: str) -> None:
    if not 0.0 < target < 1.0:
        raise CalibrationError(f"{flag}: expected a rate between 0 and 1 (0.005 = 0.5%), got {target}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(
            f"--confidence: expected a value between 0 and 1 (e.g. 0.95), got {confidence}"
        )


def check_enough(n: int, target: float, confidence: float, flag: str, parts: str) -> int:
    """Allowed exceedances j for n parts, or the one-line error naming how many parts are needed."""
    check_target(target, confidence, flag)
    j = allowed_exceedances(n, target, confidence)
    if j is None:
        raise CalibrationError(
            f"{flag} {target:g} at {confidence:g} confidence needs at least {min_parts(target, confidence)} "
            f"{parts}, got {n} (add parts, or relax the target or --confidence)"
        )
    return j


def false_reject_threshold(
    normal: Sequence[float] | np.ndarray, target: float, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, dict[str, Any]]:
    """Order-statistic threshold with P(false-reject rate > target) <= 1 - confidence (module docstring)."""
    s = np.sort(np.asarray(normal, dtype=np.float64))
    n = int(s.size)
    j = check_enough(n, target, confidence, "--target-false-reject", "good calibration parts")
    thr = float(s[n - 1 - j])
    if thr >= SCORE_UPPER_BOUND:
        raise CalibrationError(
            f"--target-false-reject: the chosen good score is {thr:g}, at the score ceiling "
            f"{SCORE_UPPER_BOUND:g}: no part could ever be rejected (the model saturates on good parts)"
        )
    return thr, _bound_params("false_reject", target, confidence, n, n - j, j)


def escape_threshold(
    defect: Sequence[float] | np.ndarray, target: float, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, dict[str, Any]]:
    """Highest threshold with P(escape rate > target) <= 1 - confidence: just below the
    (j + 1)-th smallest defect score, so at most j known defects pass."""
    s = np.sort(np.asarray(defect, dtype=np.float64))
    m = int(s.size)
    j = check_enough(m, target, confidence, "--target-escape", "labelled defective parts")
    # Runtime scores are float32: the next float32 below the score is the highest threshold
    # that still rejects that part (NG when score > threshold).
    thr = float(np.nextafter(np.float32(s[j]), np.float32(-np.inf)))
    return thr, _bound_params("escape", target, confidence, m, j + 1, j)


def _bound_params(
    objective: str, target: float, confidence: float, n: int, rank: int, allowed: int
) -> dict[str, Any]:
    return {
        "objective": objective,
        "target": target,
        "confidence": confidence,
        "n": n,
        "rank": rank,  # 1-based position of the threshold's score among the n, ascending
        "allowed": allowed,  # parts of the n allowed on the wrong side
        "bound": upper_bound(allowed, n, confidence),
    }


def _f1_optimal(normal: np.ndarray, defect: np.ndarray) -> tuple[float, float]:
    scores = np.concatenate([normal, defect])
    labels = np.concatenate([np.zeros(normal.size, bool), np.ones(defect.size, bool)])
    values = np.unique(scores)
    # Midpoints between neighbouring scores, plus one below all: each candidate is a
    # distinct verdict split, placed as far from both neighbours as possible.
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2.0])
    best_thr, best_f1 = float(candidates[0]), -1.0
    for t in candidates:
        pred = scores > t
        tp = int(np.sum(pred & labels))
        fp = int(np.sum(pred & ~labels))
        fn = int(np.sum(~pred & labels))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        # Strictly greater keeps the lowest threshold among ties: a missed defect costs
        # more on a line than a part sent to re-inspection.
        if f1 > best_f1:
            best_thr, best_f1 = float(t), f1
    return best_thr, best_f1


@dataclass
class PixelHistogram:
    """Streaming histogram of anomaly-map values in [0, 1] for the pixel quantile.

    A fixed-bin histogram keeps memory constant however many normal maps are scored;
    4096 bins resolve the quantile to 1/4096 of the map range.
    """

    bins: int = 4096
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if self.counts.size == 0:
            self.counts = np.zeros(self.bins, np.int64)

    def add(self, values: np.ndarray) -> None:
        v = np.clip(np.asarray(values, dtype=np.float32).ravel(), 0.0, 1.0)
        idx = np.minimum((v * self.bins).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        if self.total == 0:
            raise CalibrationError("pixel threshold: no anomaly-map values were collected")
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, q * self.total, side="left"))
        return min(1.0, (i + 1) / self.bins)  # upper edge of the bin holding the quantile


def pixel_threshold(
    rule: str,
    normal_pixels: PixelHistogram | None,
    *,
    quantile: float = DEFAULT_PIXEL_QUANTILE,
    value: float = DEFAULT_PIXEL_FIXED,
) -> tuple[float, dict[str, Any]]:
    if rule == "normal-quantile":
        if normal_pixels is None:
            raise CalibrationError("pixel rule normal-quantile: no normal anomaly maps were scored")
        if not 0.0 < quantile <= 1.0:
            raise CalibrationError(f"pixel rule normal-quantile: quantile must lie in (0, 1], got {quantile}")
        return normal_pixels.quantile(quantile), {"pixel_quantile": quantile}
    if rule == "fixed":
        if not 0.0 <= value <= 1.0:
            raise CalibrationError(f"pixel rule fixed: value must lie in [0, 1], got {value}")
        return float(value), {"pixel_value": value}
    raise CalibrationError(f"pixel rule {rule!r} is unknown, expected one of {PIXEL_RULES}")


def calibrate_thresholds(
    normal_scores: Sequence[float] | np.ndarray,
    defect_scores: Sequence[float] | np.ndarray | None = None,
    normal_pixels: PixelHistogram | None = None,
    *,
    rule: str = DEFAULT_IMAGE_RULE,
    margin: float = DEFAULT_MARGIN,
    quantile: float = DEFAULT_QUANTILE,
    iqr_k: float = DEFAULT_IQR_K,
    pixel_rule: str = "normal-quantile",
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    pixel_value: float = DEFAULT_PIXEL_FIXED,
    scored_with: str = "",
    target: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Thresholds:
    """Both thresholds plus the evidence behind them, ready for the metadata sidecar.

    A target rule's guarantee (objective, n, rank, bound) goes to ``operating_point``, where
    the holdout's measured rates join it (``pouta.calibration.thresholds.operating_point``)."""
    defect = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    img, params = image_threshold(
        rule,
        normal_scores,
        defect,
        margin=margin,
        quantile=quantile,
        iqr_k=iqr_k,
        target=target,
        confidence=confidence,
    )
    operating_point: dict[str, Any] = {"objective": "rule"}
    if "objective" in params:
        operating_point = params
        params = {"target": params["target"], "confidence": params["confidence"]}
    if pixel_rule == "normal-quantile" and normal_pixels is None:
        pixel_rule = "fixed"  # nothing to take a quantile of: fall back, and record it
    pix, pix_params = pixel_threshold(pixel_rule, normal_pixels, quantile=pixel_quantile, value=pixel_value)
    return Thresholds(
        image=float(img),
        pixel=float(pix),
        rule=rule,
        params={**params, "pixel_rule": pixel_rule, **pix_params},
        n_normal=int(np.asarray(normal_scores).size),
        n_defect=int(defect.size),
        normal_score_stats=score_stats(normal_scores),
        defect_score_stats=score_stats(defect),
        scored_with=scored_with,
        operating_point=operating_point,
    )
