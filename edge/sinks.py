"""The result record of one part, and the result files for the PLC (the embedded default sink).

Every part the camera saw gets exactly one ``PartResult``: ``OK``, ``NG`` or
``NOT_INSPECTED`` (dropped, corrupt, inference error, timeout after a trigger), with a
persistent sequence number, the PLC's part id when it gave one, the raw score and the
normalised score (``score / threshold``: 1.0 is the calibrated threshold, above it is NG).

Files: one JSON per part under ``parts/<UTC date>/``, one CSV line per part,
``latest.json``, ``status.json`` (heartbeat), overlays and raw frames as NG evidence
under ``overlays/<date>/`` and ``raw/<date>/``. OK and NG evidence have separate
retention limits. Every JSON/image goes through ``fsutil.atomic_write_*`` (temp file in
the same folder, fsync, rename), so a PLC polling the folder never reads half a file. A
CSV line is appended with a single ``write`` on an ``O_APPEND`` descriptor. A write
failure (disk full, read-only, folder removed) is reported once per kind, counted, and
the part's *record* (not its frame) is kept in a bounded backlog that is written, in
order and each step once, as soon as the disk accepts writes again.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .errors import ConfigError
from .fsutil import atomic_write_bytes, atomic_write_text
from .overlay import draw_overlay, to_bgr8
from .postprocess import NG, NOT_INSPECTED, OK, Verdict
from .sources import Frame

log = logging.getLogger("pouta.edge.sinks")

VERDICTS = (OK, NG, NOT_INSPECTED)
# Why a part was not inspected; the numbers are the Modbus reason codes.
REASONS = {"dropped": 1, "corrupt_frame": 2, "inference_error": 3, "timeout_after_trigger": 4}

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
OVERLAY_MODES = ("ng", "all", "none")
RAW_FORMATS = ("png", "jpg", "none")


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
    csv.writer(buf, lineterminator="\n").writerow(values)
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


class _Retention:
    """Newest N files / N bytes of one kind of evidence; older ones are deleted."""

    def __init__(self, keep_files: int, keep_mb: float) -> None:
        self.keep_files = int(keep_files)
        self.keep_bytes = int(keep_mb * 1024 * 1024)
        self.files: collections.deque[tuple[Path, int]] = collections.deque()
        self.bytes = 0

    def track(self, path: Path, size: int) -> None:
        self.files.append((path, size))
        self.bytes += size
        while self.files and (len(self.files) > self.keep_files or self.bytes > self.keep_bytes):
            old, osize = self.files.popleft()
            self.bytes -= osize
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
            # Date folders go once their last file is gone.
            with contextlib.suppress(OSError):
                old.parent.rmdir()


@dataclass
class _Pending:
    """A record waiting for the disk: what is left to write, so no step runs twice."""

    result: PartResult
    steps: list[str]


class ResultWriter:
    """Writes result files into ``out_dir``. ``write`` never raises for I/O problems: it
    returns False, counts, and keeps the record for later."""

    name = "files"
    needs_images = True

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        json_files: bool = True,
        csv: bool = True,
        latest: bool = True,
        overlays: str = "ng",
        overlay_format: str = "jpg",
        keep_files: int = 10000,
        keep_mb: float = 1024.0,
        csv_max_mb: float = 64.0,
        csv_keep: int = 8,
        fsync: bool = True,
        backlog: int = 100000,
        raw_ng: str = "png",
        ng_keep_files: int = 10000,
        ng_keep_mb: float = 2048.0,
    ) -> None:
        if overlays not in OVERLAY_MODES:
            raise ConfigError(f"output.overlays: expected one of {OVERLAY_MODES}, got {overlays!r}")
        if overlay_format not in ("jpg", "png"):
            raise ConfigError(f"output.overlay_format: expected 'jpg' or 'png', got {overlay_format!r}")
        if raw_ng not in RAW_FORMATS:
            raise ConfigError(f"output.raw_ng: expected one of {RAW_FORMATS}, got {raw_ng!r}")
        self.out = Path(out_dir)
        self.parts_dir = self.out / "parts"
        self.overlay_dir = self.out / "overlays"
        self.raw_dir = self.out / "raw"
        self.csv_path = self.out / "results.csv"
        self.latest_path = self.out / "latest.json"
        self.status_path = self.out / "status.json"
        self.json_files, self.csv, self.latest = json_files, csv, latest
        self.overlays, self.overlay_format, self.raw_ng = overlays, overlay_format, raw_ng
        # OK and NG evidence age separately: a flood of OK parts must not push out the
        # NG evidence a quality engineer needs next week.
        self.ok_files = _Retention(keep_files, keep_mb)
        self.ng_files = _Retention(ng_keep_files, ng_keep_mb)
        if csv_max_mb <= 0 or csv_keep < 0:
            raise ConfigError(
                f"output.csv_max_mb/csv_keep: expected a positive size and a count >= 0, got {csv_max_mb}/{csv_keep}"
            )
        self.csv_max_bytes = int(csv_max_mb * 1024 * 1024)
        self.csv_keep = int(csv_keep)
        self.fsync = fsync
        self.write_errors = 0
        self.written = 0
        self.evidence_lost = 0
        self.last_error: str | None = None
        self._reported: set[str] = set()
        self._backlog: collections.deque[_Pending] = collections.deque()
        self._backlog_max = max(1, int(backlog))
        self.backlog_dropped = 0
        self._lock = threading.Lock()
        self._ready = False
        self._prepare()

    # -- setup -------------------------------------------------------------
    def _prepare(self) -> bool:
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if self.csv and not self.csv_path.exists():
                self._append(self.csv_path, csv_row(CSV_COLUMNS))
        except OSError as exc:
            self._error("prepare", exc)
            return False
        if not self._ready:
            self._scan_existing()
        self._ready = True
        return True

    def _scan_existing(self) -> None:
        # Retention must hold across restarts: count what earlier runs left behind.
        found: list[tuple[float, Path, int]] = []
        for d in (self.parts_dir, self.overlay_dir, self.raw_dir):
            if not d.is_dir():
                continue
            for p in d.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        found.append((st.st_mtime, p, st.st_size))
        for _, p, size in sorted(found):
            pool = self.ok_files if p.stem.endswith(f"_{OK}") else self.ng_files
            pool.track(p, size)

    # -- errors ------------------------------------------------------------
    def _error(self, what: str, exc: OSError) -> None:
        self.write_errors += 1
        msg = f"{getattr(exc, 'filename', None) or self.out}: cannot write {what} ({exc.strerror or exc})"
        self.last_error = msg
        key = f"{what}:{exc.errno}"
        # One report per kind of failure: a full disk must not flood the log at line rate.
        if key not in self._reported:
            self._reported.add(key)
            log.error("%s; inspection continues, records kept in memory", msg)

    # -- writing -----------------------------------------------------------
    def _append(self, path: Path, line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _pool(self, r: PartResult) -> _Retention:
        return self.ok_files if r.status == OK else self.ng_files

    def _dated(self, root: Path, r: PartResult) -> Path:
        d = root / r.date
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _rotate_csv(self) -> None:
        # A line PLC polls results.csv for years: rename (atomic) at the size limit and keep
        # the newest few rotated files, so the CSV never fills the disk either.
        try:
            if self.csv_path.stat().st_size < self.csv_max_bytes:
                return
        except FileNotFoundError:
            self._append(self.csv_path, csv_row(CSV_COLUMNS))
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.out / f"results.{stamp}.csv"
        n = 1
        while target.exists():
            target = self.out / f"results.{stamp}-{n}.csv"
            n += 1
        os.replace(self.csv_path, target)
        self._append(self.csv_path, csv_row(CSV_COLUMNS))
        rotated = sorted(self.out.glob("results.*.csv"), key=lambda p: p.stat().st_mtime_ns)
        for old in rotated[: max(0, len(rotated) - self.csv_keep)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def _steps(self) -> list[str]:
        return [s for s, on in (("json", self.json_files), ("csv", self.csv), ("latest", self.latest)) if on]

    def _run_steps(self, p: _Pending) -> None:
        """Writes what is left of one record; a step that succeeded is never repeated
        (a CSV line appended twice would be a duplicate part for the PLC)."""
        r = p.result
        while p.steps:
            step = p.steps[0]
            if step == "json":
                data = (json.dumps(r.to_dict(), indent=1) + "\n").encode("utf-8")
                path = atomic_write_bytes(
                    self._dated(self.parts_dir, r) / f"{r.stem}.json", data, fsync=self.fsync
                )
                self._pool(r).track(path, len(data))
            elif step == "csv":
                self._rotate_csv()
                self._append(self.csv_path, r.csv_line())
            elif step == "latest":
                atomic_write_text(
                    self.latest_path, json.dumps(r.to_dict(), indent=1) + "\n", fsync=self.fsync
                )
            p.steps.pop(0)

    def _write_evidence(self, r: PartResult) -> None:
        """Overlay and raw frame; best effort on the first attempt only (frames are never
        kept for a retry: that is what would exhaust memory while a disk is down)."""
        if not r.has_image:
            return
        ng = r.status != OK
        want_overlay = (self.overlays == "all" or (self.overlays == "ng" and ng)) and r.verdict is not None
        want_raw = ng and self.raw_ng != "none"
        try:
            if want_raw:
                self._write_raw(r)
            if want_overlay:
                self._write_overlay(r)
        except OSError as exc:
            self.evidence_lost += 1
            self._error("NG evidence", exc)

    def _encode(self, img: np.ndarray, ext: str) -> bytes:
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
        ok, buf = cv2.imencode(ext, img, params)
        if not ok:
            raise OSError(f"OpenCV could not encode the image as {ext}")
        return buf.tobytes()

    def _write_raw(self, r: PartResult) -> None:
        img = r.frame.image
        # 16-bit mono stays 16-bit in PNG: the evidence is the frame the model judged.
        if img.ndim == 3 or img.dtype.kind == "f":
            img = to_bgr8(img, r.frame.color_order)
        data = self._encode(img, "." + self.raw_ng)
        path = atomic_write_bytes(
            self._dated(self.raw_dir, r) / f"{r.stem}.{self.raw_ng}", data, fsync=self.fsync
        )
        self._pool(r).track(path, len(data))

    def _write_overlay(self, r: PartResult) -> None:
        v = r.verdict
        img = r.frame.image
        if v is None or v.anomaly_map is None:
            return
        amap = v.geometry.to_source(v.anomaly_map) if v.geometry is not None else v.anomaly_map
        norm = r.score_norm
        label = [
            f"{v.verdict}  {norm:.2f}x threshold" if norm is not None else v.verdict,
            f"#{r.seq}" + (f"  part {r.part_id}" if r.part_id else ""),
            utc_iso(r.wall_time),
        ]
        pic = draw_overlay(img, amap, v.verdict, v.score, v.pixel_threshold, r.frame.color_order, label=label)
        ext = "." + self.overlay_format
        data = self._encode(pic, ext)
        path = atomic_write_bytes(self._dated(self.overlay_dir, r) / f"{r.stem}{ext}", data, fsync=self.fsync)
        self._pool(r).track(path, len(data))

    def write(self, result: PartResult) -> bool:
        """Write one part's files; on failure keep its record and return False."""
        with self._lock:
            if not self._ready and not self._prepare():
                result.release_image()
                self._keep(_Pending(result, self._steps()))
                return False
            self._write_evidence(result)
            result.release_image()
            self._keep(_Pending(result, self._steps()))
            return self._flush()

    def _flush(self) -> bool:
        # Older records first, so the files keep the order the parts came in.
        while self._backlog:
            try:
                self._run_steps(self._backlog[0])
            except OSError as exc:
                self._error("result files", exc)
                return False
            self._backlog.popleft()
            self.written += 1
        return True

    def _keep(self, pending: _Pending) -> None:
        if len(self._backlog) >= self._backlog_max:
            self._backlog.popleft()
            self.backlog_dropped += 1
        self._backlog.append(pending)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def heartbeat(self, beat: int, state: dict[str, Any]) -> None:
        # Not under the write lock: a hung disk must not stop the heartbeat thread, and
        # status.json is its own atomic file.
        with contextlib.suppress(OSError):
            atomic_write_text(self.status_path, json.dumps({"heartbeat": beat, **state}) + "\n", fsync=False)

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "errors": self.write_errors,
            "backlog": self.backlog,
            "backlog_dropped": self.backlog_dropped,
            "evidence_lost": self.evidence_lost,
        }

    def close(self) -> None:
        with self._lock:
            if self._ready or self._prepare():
                self._flush()
