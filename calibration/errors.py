"""Errors raised by calibration and engine building (one-line, user-fixable messages)."""

from __future__ import annotations

from pouta.edge.contract.errors import PoutaError


class CalibrationError(PoutaError):
    """Calibration images, threshold rule, quantization or engine build cannot proceed."""
