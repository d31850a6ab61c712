"""Result files for the PLC: one JSON per part, one CSV line per part, latest.json,
overlay images, a retention limit, and a disk that may fail at any moment.

Every JSON/image goes through ``fsutil.atomic_write_*`` (temp file in the same folder,
fsync, rename), so a PLC polling the folder never reads half a file. A CSV line is
appended with a single ``write`` on an ``O_APPEND`` descriptor, so readers see whole
lines. A write failure (disk full, read-only, folder removed) is reported once per
kind, counted, and the result is kept in a bounded in-memory backlog that is flushed
as soon as the disk accepts writes again; inspection never stops for the disk.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .errors import ConfigError
from .fsutil import atomic_write_bytes, atomic_write_text
from .overlay import draw_overlay
from .postprocess import Verdict
from .sources import Frame

log = logging.getLogger("pouta.edge.sinks")

CSV_COLUMNS = (
    "wall_time",
    "frame_id",
    "camera_timestamp_ns",
    "source",
    "path",
    "verdict",
    "score",
    "threshold",
    "n_regions",
    "label",
    "latency_ms",
    "model_id",
)
OVERLAY_MODES = ("ng", "all", "none")


@dataclass
class PartResult:
    """Everything known about one inspected part."""

    frame: Frame
    verdict: Verdict
    model_id: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)
    amap_to_source: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None

    @property
    def stem(self) -> str:
        t = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.wall_time))
        ms = int((self.wall_time % 1) * 1000)
        return f"{t}.{ms:03d}_{self.frame.frame_id:08d}"

    def to_dict(self) -> dict[str, Any]:
        f = self.frame
        return {
            "frame_id": f.frame_id,
            "camera_timestamp_ns": f.timestamp_ns,
            "wall_time": round(self.wall_time, 6),
            "wall_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.wall_time))
            + f".{int((self.wall_time % 1) * 1000):03d}",
            "source": f.source,
            "path": f.path,
            "image_size": [int(f.image.shape[1]), int(f.image.shape[0])],
            **self.verdict.to_dict(),
            "label": f.label,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "model_id": self.model_id,
        }

    def csv_line(self) -> str:
        d = self.to_dict()
        vals = [
            d["wall_time"],
            d["frame_id"],
            d["camera_timestamp_ns"],
            d["source"],
            d["path"] or "",
            d["verdict"],
            d["score"],
            d["threshold"],
            len(d["regions"]),
            d["label"] or "",
            d["latency_ms"].get("total", ""),
            d["model_id"],
        ]
        return ",".join(_csv_field(v) for v in vals) + "\n"


def _csv_field(v: object) -> str:
    s = str(v)
    if any(c in s for c in ',"\n\r'):
        return '"' + s.replace('"', '""') + '"'
    return s


class ResultSink(Protocol):
    def write(self, result: PartResult) -> bool: ...

    def close(self) -> None: ...


class ResultWriter:
    """Writes result files into ``out_dir`` (``parts/``, ``overlays/``, ``results.csv``,
    ``latest.json``). ``write`` never raises for I/O problems: it returns False and counts."""

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
        backlog: int = 1000,
    ) -> None:
        if overlays not in OVERLAY_MODES:
            raise ConfigError(f"output.overlays: expected one of {OVERLAY_MODES}, got {overlays!r}")
        if overlay_format not in ("jpg", "png"):
            raise ConfigError(f"output.overlay_format: expected 'jpg' or 'png', got {overlay_format!r}")
        self.out = Path(out_dir)
        self.parts_dir = self.out / "parts"
        self.overlay_dir = self.out / "overlays"
        self.csv_path = self.out / "results.csv"
        self.latest_path = self.out / "latest.json"
        self.json_files, self.csv, self.latest = json_files, csv, latest
        self.overlays, self.overlay_format = overlays, overlay_format
        self.keep_files = int(keep_files)
        self.keep_bytes = int(keep_mb * 1024 * 1024)
        if csv_max_mb <= 0 or csv_keep < 0:
            raise ConfigError(
                f"output.csv_max_mb/csv_keep: expected a positive size and a count >= 0, got {csv_max_mb}/{csv_keep}"
            )
        self.csv_max_bytes = int(csv_max_mb * 1024 * 1024)
        self.csv_keep = int(csv_keep)
        self.fsync = fsync
        self.write_errors = 0
        self.written = 0
        self.last_error: str | None = None
        self._reported: set[str] = set()
        self._backlog: collections.deque[PartResult] = collections.deque(maxlen=backlog)
        self.backlog_dropped = 0
        self._files: collections.deque[tuple[Path, int]] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._ready = False
        self._prepare()

    # -- setup -------------------------------------------------------------
    def _prepare(self) -> bool:
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if self.overlays != "none":
                self.overlay_dir.mkdir(parents=True, exist_ok=True)
            if self.csv and not self.csv_path.exists():
                self._append(self.csv_path, ",".join(CSV_COLUMNS) + "\n")
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
        for d in (self.parts_dir, self.overlay_dir):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.is_file() and not p.name.startswith("."):
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        found.append((st.st_mtime, p, st.st_size))
        for _, p, size in sorted(found):
            self._files.append((p, size))
            self._bytes += size

    # -- errors ------------------------------------------------------------
    def _error(self, what: str, exc: OSError) -> None:
        self.write_errors += 1
        msg = f"{getattr(exc, 'filename', None) or self.out}: cannot write {what} ({exc.strerror or exc})"
        self.last_error = msg
        key = f"{what}:{exc.errno}"
        # One report per kind of failure: a full disk must not flood the log at line rate.
        if key not in self._reported:
            self._reported.add(key)
            log.error("%s; inspection continues, results kept in memory", msg)

    # -- writing -----------------------------------------------------------
    def _append(self, path: Path, line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _track(self, path: Path, size: int) -> None:
        self._files.append((path, size))
        self._bytes += size
        while self._files and (len(self._files) > self.keep_files or self._bytes > self.keep_bytes):
            old, osize = self._files.popleft()
            self._bytes -= osize
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def _rotate_csv(self) -> None:
        # A line PLC polls results.csv for years: rename (atomic) at the size limit and keep
        # the newest few rotated files, so the CSV never fills the disk either.
        try:
            if self.csv_path.stat().st_size < self.csv_max_bytes:
                return
        except FileNotFoundError:
            self._append(self.csv_path, ",".join(CSV_COLUMNS) + "\n")
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.out / f"results.{stamp}.csv"
        n = 1
        while target.exists():
            target = self.out / f"results.{stamp}-{n}.csv"
            n += 1
        os.replace(self.csv_path, target)
        self._append(self.csv_path, ",".join(CSV_COLUMNS) + "\n")
        rotated = sorted(self.out.glob("results.*.csv"), key=lambda p: p.stat().st_mtime_ns)
        for old in rotated[: max(0, len(rotated) - self.csv_keep)]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()

    def _write_one(self, r: PartResult) -> None:
        d = r.to_dict()
        stem = r.stem
        if self.json_files:
            data = (json.dumps(d, indent=1) + "\n").encode("utf-8")
            path = atomic_write_bytes(self.parts_dir / f"{stem}.json", data, fsync=self.fsync)
            self._track(path, len(data))
        if self.overlays == "all" or (self.overlays == "ng" and r.verdict.is_ng):
            self._write_overlay(r, stem)
        if self.csv:
            self._rotate_csv()
            self._append(self.csv_path, r.csv_line())
        if self.latest:
            atomic_write_text(self.latest_path, json.dumps(d, indent=1) + "\n", fsync=self.fsync)

    def _write_overlay(self, r: PartResult, stem: str) -> None:
        v = r.verdict
        img = r.frame.image
        if v.anomaly_map is None:
            return
        if r.amap_to_source is not None:
            amap = r.amap_to_source(v.anomaly_map, img.shape)
        else:
            amap = cv2.resize(v.anomaly_map, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        pic = draw_overlay(img, amap, v.verdict, v.score, v.pixel_threshold, r.frame.color_order)
        ext = "." + self.overlay_format
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else []
        ok, buf = cv2.imencode(ext, pic, params)
        if not ok:
            raise OSError(f"OpenCV could not encode the overlay as {ext}")
        data = buf.tobytes()
        path = atomic_write_bytes(self.overlay_dir / f"{stem}{ext}", data, fsync=self.fsync)
        self._track(path, len(data))

    def write(self, result: PartResult) -> bool:
        """Write one part's files; on failure keep it in memory and return False."""
        with self._lock:
            if not self._ready and not self._prepare():
                self._keep(result)
                return False
            # Older results first, so the files keep the order the parts came in.
            while self._backlog:
                pending = self._backlog[0]
                try:
                    self._write_one(pending)
                except OSError as exc:
                    self._error("result files", exc)
                    self._keep(result)
                    return False
                self._backlog.popleft()
                self.written += 1
            try:
                self._write_one(result)
            except OSError as exc:
                self._error("result files", exc)
                self._keep(result)
                return False
            self.written += 1
            return True

    def _keep(self, result: PartResult) -> None:
        if len(self._backlog) == self._backlog.maxlen:
            self.backlog_dropped += 1
        self._backlog.append(result)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        with self._lock:
            while self._backlog:
                try:
                    self._write_one(self._backlog[0])
                except OSError as exc:
                    self._error("result files", exc)
                    return
                self._backlog.popleft()
                self.written += 1
