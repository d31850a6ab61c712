"""The operating point measured on labelled held-out parts: what a threshold costs.

A part is NG when its score is above the threshold, so a good part above it is a false
reject and a defective part at or below it is an escape. Every rate carries its exact
(Clopper-Pearson) interval at the calibration's confidence, and escapes are also counted
per defect type (the holdout's ``test/<defect>`` folder), because a line that stops all
cracks but passes every scratch does not have one escape rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .binomial import clopper_pearson

CURVE_POINTS = 121  # thresholds on the trade-off curve; the bands are exact at each one


@dataclass
class HeldOut:
    """Scores of labelled parts that were not used to choose the threshold (unless marked)."""

    good: np.ndarray
    defect: np.ndarray
    defect_types: list[str]
    split: str
    good_files: list[Path] = field(default_factory=list)
    defect_files: list[Path] = field(default_factory=list)
    # True where that class chose the threshold: its measured rate is then optimistic.
    good_in_sample: bool = False
    defect_in_sample: bool = False

    def __post_init__(self) -> None:
        self.good = np.asarray(self.good, dtype=np.float64)
        self.defect = np.asarray(self.defect, dtype=np.float64)
        if len(self.defect_types) != self.defect.size:
            raise ValueError(f"{len(self.defect_types)} defect types for {self.defect.size} defect scores")


def defect_type(path: Path, root: Path) -> str:
    """``root/<type>/.../x.png`` -> ``<type>``; an image directly in ``root`` takes the folder's name."""
    rel = path.relative_to(root).parts
    return rel[0] if len(rel) > 1 else root.name


def rate(count: int, n: int, confidence: float) -> dict[str, Any]:
    lo, hi = clopper_pearson(count, n, confidence)
    return {"count": int(count), "n": int(n), "rate": count / n if n else 0.0, "ci": [lo, hi]}


def measure(threshold: float, held: HeldOut, confidence: float) -> dict[str, Any]:
    """False-reject and escape rates at ``threshold`` with intervals, escapes per defect type."""
    out: dict[str, Any] = {"split": held.split, "confidence": confidence}
    if held.good.size:
        out["false_reject"] = {
            **rate(int(np.sum(held.good > threshold)), held.good.size, confidence),
            "in_sample": held.good_in_sample,
        }
    if held.defect.size:
        escaped = held.defect <= threshold
        out["escape"] = {
            **rate(int(escaped.sum()), held.defect.size, confidence),
            "in_sample": held.defect_in_sample,
        }
        types = np.asarray(held.defect_types)
        out["escape_by_type"] = {
            t: rate(int(escaped[types == t].sum()), int(np.sum(types == t)), confidence)
            for t in sorted(set(held.defect_types))
        }
    return out


@dataclass
class Curves:
    """False-reject and escape rates (with pointwise exact bands) over a threshold sweep."""

    thresholds: np.ndarray
    false_reject: np.ndarray
    false_reject_band: np.ndarray  # [N, 2]
    escape: np.ndarray
    escape_band: np.ndarray  # [N, 2]


def curves(good: np.ndarray, defect: np.ndarray, confidence: float, points: int = CURVE_POINTS) -> Curves:
    """The trade-off over thresholds spanning both score sets (a little beyond each end)."""
    both = np.concatenate([good, defect])
    lo, hi = float(both.min()), float(both.max())
    pad = max((hi - lo) * 0.02, 1e-6)
    t = np.linspace(lo - pad, hi + pad, points)
    fr = np.array([np.sum(good > x) for x in t])
    es = np.array([np.sum(defect <= x) for x in t])
    return Curves(
        thresholds=t,
        false_reject=fr / max(good.size, 1),
        false_reject_band=np.array([clopper_pearson(int(k), good.size, confidence) for k in fr]),
        escape=es / max(defect.size, 1),
        escape_band=np.array([clopper_pearson(int(k), defect.size, confidence) for k in es]),
    )


def roc(good: np.ndarray, defect: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-reject rate, detection rate = 1 - escape rate, threshold) at every distinct score,
    from reject-nothing to reject-everything."""
    t = np.concatenate([[np.inf], np.unique(np.concatenate([good, defect]))[::-1], [-np.inf]])
    fpr = np.array([np.mean(good > x) if good.size else 0.0 for x in t])
    tpr = np.array([np.mean(defect > x) if defect.size else 0.0 for x in t])
    return fpr, tpr, t


def nearest_misses(scores: np.ndarray, k: int, good: bool) -> list[int]:
    """Indices of the k parts closest to the wrong side (or on it): the highest-scoring good
    parts, the lowest-scoring defective ones, worst first."""
    order = np.argsort(-scores if good else scores, kind="stable")
    return [int(i) for i in order[:k]]
