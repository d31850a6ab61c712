"""The result record of one part, and what every sink of records implements.

Every part the camera saw gets exactly one ``PartResult``: ``OK``, ``NG`` or
``NOT_INSPECTED`` (dropped, corrupt, inference error, timeout after a trigger), with a
persistent sequence number, the PLC's part id when it gave one, the raw score and the
normalised score (``score / threshold``: 1.0 is the calibrated threshold, above it is NG).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..postprocess import NG, NOT_INSPECTED, OK, Verdict
from ..sources.protocol import Frame

VERDICTS = (OK, NG, NOT_INSPECTED)
# Why a part was not inspected; the numbers are the Modbus reason codes.
REASONS = {
    "dropped": 1,
    "corrupt_frame": 2,
    "inference_error": 3,
    "timeout_after_trigger": 4,
    "non_finite_score": 5,
    "verdict_timeout": 6,
}
PART_ID_MAX = 64  # characters; a PLC's part id is a serial number, not a document


def clean_part_id(value: object) -> str | None:
    """A part id fit for records, file names of evidence, CSV and registers, or None.

    Bounded length and printable characters only: an id comes from a network client
    (Modbus, OPC UA) and ends up in every record of that part.
    """
    if value is None:
        return None
    text = str(value)
    if not text or len(text) > PART_ID_MAX or not text.isprintable():
        return None
    return text


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A string cell that a spreadsheet would run as a formula gets a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


CSV_COLUMNS = (
    "wall_time",
    "seq",
    "part_id",
    "frame_id",
    "camera_timestamp_ns",
    "source",
    "path",
    "verdict",
    "reject",
    "score",
    "score_norm",
    "threshold",
    "n_regions",
    "reason",
    "label",
    "latency_ms",
    "model_id",
)


def utc_iso(t: float) -> str:
    """Epoch seconds -> ``2024-05-01T12:00:00.123Z`` (UTC, millisecond resolution)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def normalised_score(score: float, threshold: float) -> float:
    """1.0 at the calibrated threshold, linear in the raw score: NG exactly when > 1.0."""
    return float(score) / threshold if threshold > 0 else float("inf") if score > 0 else 0.0


@dataclass
class PartResult:
    """Everything known about one part the camera saw; ``verdict`` is None when not inspected."""

    frame: Frame
    verdict: Verdict | None
    model_id: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)
    seq: int = 0
    part_id: str | None = None
    reason: str | None = None  # one of REASONS when not inspected
    not_inspected_is_ng: bool = True  # fail-safe: a part nobody judged is rejected
    previous_model_id: str | None = None  # set on the first part after a model change
    gap: str | None = None  # "crash": numbers before this one were reserved by a run that crashed
    _record: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return self.verdict.verdict if self.verdict is not None else NOT_INSPECTED

    @property
    def reject(self) -> bool:
        """What the reject gate must do with this part."""
        if self.verdict is None:
            return self.not_inspected_is_ng
        return self.verdict.is_ng

    @property
    def score_norm(self) -> float | None:
        if self.verdict is None:
            return None
        return normalised_score(self.verdict.score, self.verdict.threshold)

    @property
    def stem(self) -> str:
        t = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.wall_time))
        return f"{t}.{int((self.wall_time % 1) * 1000):03d}Z_{self.seq:010d}_{self.status}"

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.wall_time))

    @property
    def has_image(self) -> bool:
        return self.frame.image.size > 0

    def release_image(self) -> None:
        """Drop pixels and map (bounded memory in backlogs); the record stays complete."""
        self.to_dict()  # the record keeps the image size
        if self.has_image:
            self.frame = Frame(
                np.empty((0, 0), np.uint8),
                self.frame.frame_id,
                self.frame.timestamp_ns,
                self.frame.source,
                self.frame.label,
                self.frame.path,
                self.frame.color_order,
                self.frame.acquired,
            )
        if self.verdict is not None:
            self.verdict.anomaly_map = None

    def to_dict(self) -> dict[str, Any]:
        """The record every sink publishes; computed once (sinks run in several threads)."""
        if self._record is not None:
            return self._record
        f = self.frame
        v = self.verdict
        norm = self.score_norm
        d: dict[str, Any] = {
            "seq": self.seq,
            "part_id": self.part_id,
            "verdict": self.status,
            "reject": self.reject,
            "reason": self.reason,
            "score": round(float(v.score), 6) if v else None,
            "score_norm": round(norm, 4) if norm is not None and np.isfinite(norm) else None,
            "threshold": float(v.threshold) if v else None,
            "pixel_threshold": float(v.pixel_threshold) if v else None,
            "regions": [r.to_dict() for r in v.regions] if v else [],
            "frame_id": f.frame_id,
            "camera_timestamp_ns": f.timestamp_ns,
            "wall_time": round(self.wall_time, 6),
            "wall_time_iso": utc_iso(self.wall_time),
            "source": f.source,
            "path": f.path,
            "image_size": [int(f.image.shape[1]), int(f.image.shape[0])] if f.image.size else None,
            "label": f.label,
            "latency_ms": {k: round(val, 3) for k, val in self.latency_ms.items()},
            "model_id": self.model_id,
        }
        if self.previous_model_id is not None:
            d["model_change"] = {"from": self.previous_model_id, "to": self.model_id}
        if self.gap:
            d["sequence_gap"] = self.gap
        self._record = d
        return d

    def csv_line(self) -> str:
        d = self.to_dict()
        vals = [
            d["wall_time"],
            d["seq"],
            d["part_id"] or "",
            d["frame_id"],
            d["camera_timestamp_ns"],
            d["source"],
            d["path"] or "",
            d["verdict"],
            int(d["reject"]),
            "" if d["score"] is None else d["score"],
            "" if d["score_norm"] is None else d["score_norm"],
            "" if d["threshold"] is None else d["threshold"],
            len(d["regions"]),
            d["reason"] or "",
            d["label"] or "",
            d["latency_ms"].get("total", ""),
            d["model_id"],
        ]
        return csv_row(vals)


def csv_row(values: list[Any] | tuple[Any, ...]) -> str:
    """One CSV line (the stdlib's minimal quoting), newline included."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([csv_safe(v) for v in values])
    return buf.getvalue()


class ResultSink(Protocol):
    """What the pipeline hands every part to.

    ``stats()`` returns the counters only the sink can see (written, errors, backlog ...);
    the pipeline reports them as they are. ``needs_images`` False: the sink gets records
    without pixels. Optional capabilities a sink may have: ``heartbeat(beat, state)`` and
    ``part_id() -> str | None`` (an id the PLC wrote for the next part).
    """

    name: str
    needs_images: bool

    def write(self, result: PartResult) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
