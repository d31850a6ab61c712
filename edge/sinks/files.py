"""The result files for the PLC (the embedded default sink) of each ``records.PartResult``.

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
import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..contract.errors import ConfigError
from ..contract.fsutil import atomic_write_bytes, atomic_write_text
from ..contract.overlay import as_stored, draw_overlay
from ..postprocess import OK
from .records import CSV_COLUMNS, PartResult, csv_row, utc_iso

log = logging.getLogger("pouta.edge.sinks.files")

OVERLAY_MODES = ("ng", "all", "none")
RAW_FORMATS = ("png", "jpg", "none")


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
        umask: int = 0o022,
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
        self.mode = 0o666 & ~int(umask)
        self.unwritten_at_close = 0
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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
        try:
            data = memoryview(line.encode("utf-8"))
            # A short write (a full disk mid-line) writes the rest, or fails loudly: never
            # a silently broken line.
            while data:
                n = os.write(fd, data)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write", str(path))
                data = data[n:]
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
                    self._dated(self.parts_dir, r) / f"{r.stem}.json", data, fsync=self.fsync, mode=self.mode
                )
                self._pool(r).track(path, len(data))
            elif step == "csv":
                self._rotate_csv()
                self._append(self.csv_path, r.csv_line())
            elif step == "latest":
                atomic_write_text(
                    self.latest_path,
                    json.dumps(r.to_dict(), indent=1) + "\n",
                    fsync=self.fsync,
                    mode=self.mode,
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
        data = self._encode(as_stored(r.frame.image, r.frame.color_order), "." + self.raw_ng)
        path = atomic_write_bytes(
            self._dated(self.raw_dir, r) / f"{r.stem}.{self.raw_ng}", data, fsync=self.fsync, mode=self.mode
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
        path = atomic_write_bytes(
            self._dated(self.overlay_dir, r) / f"{r.stem}{ext}", data, fsync=self.fsync, mode=self.mode
        )
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
            atomic_write_text(
                self.status_path, json.dumps({"heartbeat": beat, **state}) + "\n", fsync=False, mode=self.mode
            )

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "errors": self.write_errors,
            "backlog": self.backlog,
            "backlog_dropped": self.backlog_dropped,
            "evidence_lost": self.evidence_lost,
            "unwritten_at_close": self.unwritten_at_close,
        }

    def close(self) -> None:
        with self._lock:
            if self._ready or self._prepare():
                self._flush()
            if self._backlog:
                self.unwritten_at_close = len(self._backlog)
                log.error(
                    "%s: %d records could not be written before exit", self.out, self.unwritten_at_close
                )
