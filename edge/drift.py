"""Score drift: the rolling median of OK parts' scores relative to the calibration set's median.

Lighting, focus or fixture drift lifts the scores of good parts long before they cross
the threshold; watching the ratio shows it while there are still no false rejects. The
reference is ``thresholds.normal_score_stats["p50"]`` of the model's metadata (the
median score of the calibration set's normal images, written by ``pouta-calibrate`` /
``pouta-build-engine``). A model without it has no drift reference: ``ratio`` is None.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import numpy as np

from .contract.errors import ConfigError
from .contract.metadata import Thresholds

log = logging.getLogger("pouta.edge.drift")


def calibration_median(thresholds: Thresholds | None) -> float | None:
    stats = thresholds.normal_score_stats if thresholds is not None else {}
    median = stats.get("p50") if stats else None
    return float(median) if median is not None and median > 0 else None


class ScoreDrift:
    """Rolling median of the last ``window`` OK scores / calibration median; thread-safe.

    A warning is logged once when the ratio goes past ``warn_ratio`` and once when it is
    back; nothing is judged before ``min_parts`` OK parts were seen (a median of three
    parts says nothing about the light).
    """

    def __init__(
        self, reference: float | None, window: int = 200, warn_ratio: float = 1.5, min_parts: int = 20
    ) -> None:
        if window < 1:
            raise ConfigError(f"http.drift_window: expected >= 1 OK parts, got {window}")
        if warn_ratio <= 1.0:
            raise ConfigError(f"http.drift_warn_ratio: expected a ratio > 1, got {warn_ratio}")
        self.reference = reference
        self.warn_ratio = float(warn_ratio)
        self.min_parts = max(1, min(int(min_parts), int(window)))
        self._scores: collections.deque[float] = collections.deque(maxlen=int(window))
        self._lock = threading.Lock()
        self._ratio: float | None = None
        self._dirty = False
        self.warning = False

    def set_reference(self, reference: float | None) -> None:
        """A recalibrated model (hot reload) has a new reference median."""
        with self._lock:
            self.reference = reference
            self._dirty = True

    def add(self, score: float) -> None:
        """One OK part's raw score."""
        with self._lock:
            self._scores.append(float(score))
            self._dirty = True

    def ratio(self) -> float | None:
        with self._lock:
            if self._dirty:
                self._dirty = False
                if self.reference is None or len(self._scores) < self.min_parts:
                    self._ratio = None
                else:
                    self._ratio = float(np.median(np.fromiter(self._scores, np.float64))) / self.reference
            ratio = self._ratio
        warn = ratio is not None and ratio > self.warn_ratio
        if warn != self.warning:
            self.warning = warn
            if warn:
                log.warning(
                    "score drift: the median score of the last %d OK parts is %.2fx the calibration "
                    "median (warning above %.2fx): check lighting, focus and the fixture",
                    len(self._scores),
                    ratio,
                    self.warn_ratio,
                )
            else:
                log.warning("score drift back to normal (%.2fx the calibration median)", ratio or 0.0)
        return ratio

    def snapshot(self) -> dict[str, Any]:
        ratio = self.ratio()
        return {
            "ratio": None if ratio is None else round(ratio, 4),
            "warn_ratio": self.warn_ratio,
            "warning": self.warning,
            "ok_parts": len(self._scores),
            "reference": self.reference,
        }
