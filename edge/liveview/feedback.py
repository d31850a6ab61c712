"""Operator feedback that becomes data: a false reject or a missed defect, marked in the live
view, leaves the judged frame in ``<output>/feedback/`` in MVTec layout.

``feedback/good/<seq>_<part>.png`` holds parts the line rejected that were good;
``feedback/<reason>/<seq>_<part>.png`` parts it passed that were defective. The folder is a
labelled test split as it stands (``pouta-calibrate --holdout <output>/feedback``), and its
``good/`` adds to a training folder. Each picture has a JSON sidecar beside it (image loaders
read image extensions only).

The sink keeps references to the last ``keep`` judged frames (``peek``, in the write thread,
no copies), so the saved picture is the very frame the verdict came from; an older part's
frame is gone, and marking it is refused rather than saving some other picture.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..contract.errors import ConfigError
from ..contract.fsutil import atomic_write_bytes, atomic_write_json
from ..contract.overlay import as_stored
from ..postprocess import NG, OK
from ..sinks.records import PartResult, utc_iso

log = logging.getLogger("pouta.edge.liveview.feedback")

FALSE_REJECT = "false_reject"  # the line said NG, the part is good
MISSED = "missed"  # the line said OK, the part is defective
LABELS = (FALSE_REJECT, MISSED)
REASONS = ("missed", "scratch", "crack", "dent", "contamination", "color", "misaligned", "other")
GOOD_NAMES = frozenset({"good", "normal"})  # a defect folder by these names would be read as good parts
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


class FeedbackRefused(Exception):
    """A mark that cannot be taken; ``status`` is the HTTP status, the message one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def safe_name(text: str, limit: int = 40) -> str:
    """Free text -> a folder/file name of [a-z0-9_-] (empty when nothing usable is left)."""
    return _UNSAFE.sub("_", str(text).strip().lower()).strip("_-")[:limit]


def reason_folder(reason: str | None) -> str:
    """The defect folder for a missed part: a listed reason, or free text made safe."""
    name = safe_name(reason or "") or MISSED
    if name in GOOD_NAMES:
        raise FeedbackRefused(
            400, f"reason: {reason!r} would file a defect as a good part; name the defect (e.g. scratch)"
        )
    return name


class FeedbackSink:
    """Result sink: frame references by sequence number (``peek``), and ``mark`` from the HTTP
    thread, which writes the picture and its sidecar."""

    name = "feedback"
    needs_images = False  # frames are taken in ``peek``; the record queue stays pixel-free

    def __init__(self, out_dir: str | Path, keep: int = 32) -> None:
        if int(keep) < 1:
            raise ConfigError(f"http.feedback_frames: expected >= 1, got {keep}")
        self.dir = Path(out_dir)
        self.keep = int(keep)
        self._lock = threading.Lock()
        self._parts: collections.OrderedDict[int, tuple[dict[str, Any], np.ndarray | None, str]] = (
            collections.OrderedDict()
        )
        self._marked: dict[int, str] = {}
        self.first_seq: int | None = None  # numbers go on across runs: this run's range
        self.last_seq: int | None = None
        self.counts = {FALSE_REJECT: 0, MISSED: 0}

    # -- write thread --------------------------------------------------------
    def peek(self, result: PartResult) -> None:
        """Keep the record and a reference to the judged frame; return at once, never raise."""
        try:
            image = result.frame.image if result.verdict is not None and result.has_image else None
            with self._lock:
                self._parts[result.seq] = (result.to_dict(), image, result.frame.color_order)
                self.first_seq = result.seq if self.first_seq is None else min(self.first_seq, result.seq)
                self.last_seq = result.seq if self.last_seq is None else max(self.last_seq, result.seq)
                while len(self._parts) > self.keep:
                    self._parts.popitem(last=False)
        except Exception as exc:  # the line must not notice the feedback store
            log.debug("feedback could not keep part %s: %s", getattr(result, "seq", "?"), exc)

    def write(self, result: PartResult) -> bool:
        return True

    # -- HTTP thread -----------------------------------------------------------
    def mark(self, seq: int, label: str, reason: str | None = None) -> dict[str, Any]:
        """File part ``seq`` as ``label``; returns the written paths. Raises ``FeedbackRefused``
        (nothing written) for an unknown or forgotten part, a verdict that does not fit the
        label, or a part already marked."""
        if label not in LABELS:
            raise FeedbackRefused(400, f"label: expected one of {', '.join(LABELS)}, got {label!r}")
        folder = "good" if label == FALSE_REJECT else reason_folder(reason)
        with self._lock:
            entry = self._parts.get(seq)
            first, last = self.first_seq, self.last_seq
            if entry is None:
                if first is None or last is None or not first <= seq <= last:
                    raise FeedbackRefused(404, f"seq: no part {seq} in this run")
                raise FeedbackRefused(
                    410, f"seq: the frame of part {seq} is no longer kept (only the last {self.keep} parts)"
                )
            if seq in self._marked:
                raise FeedbackRefused(409, f"seq: part {seq} is already marked {self._marked[seq]}")
            record, image, color_order = entry
            want = NG if label == FALSE_REJECT else OK
            if record["verdict"] != want:
                what = "false reject" if label == FALSE_REJECT else "missed defect"
                raise FeedbackRefused(
                    409, f"seq: part {seq} was judged {record['verdict']}; a {what} must be a {want} part"
                )
            if image is None:
                raise FeedbackRefused(410, f"seq: part {seq} has no frame to keep")
            self._marked[seq] = label  # claimed before the slow write, so a double click files once
        part = safe_name(record["part_id"] or "")
        stem = f"{seq:010d}_{part}" if part else f"{seq:010d}"
        png = self.dir / folder / f"{stem}.png"
        try:
            ok, buf = cv2.imencode(".png", as_stored(image, color_order))
            if not ok:
                raise OSError("OpenCV could not encode the frame as PNG")
            png.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(png, buf.tobytes())  # an operator's word: worth an fsync
            sidecar = {
                "seq": seq,
                "part_id": record["part_id"],
                "model_id": record["model_id"],
                "verdict": record["verdict"],
                "score": record["score"],
                "threshold": record["threshold"],
                "label": label,
                "folder": folder,
                "reason": reason if label == MISSED else None,
                "judged_at": record["wall_time_iso"],
                "time": utc_iso(time.time()),
            }
            atomic_write_json(png.with_suffix(".json"), sidecar)
        except OSError as exc:
            with self._lock:
                self._marked.pop(seq, None)
            png.unlink(missing_ok=True)
            raise FeedbackRefused(507, f"{png}: cannot write the feedback picture ({exc})") from None
        with self._lock:
            self.counts[label] += 1
        return {"seq": seq, "label": label, "path": str(png), "sidecar": str(png.with_suffix(".json"))}

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "kept": len(self._parts), "dir": str(self.dir)}

    def stats(self) -> dict[str, Any]:
        return self.summary()

    def close(self) -> None:
        """The kept frames stay: the page can still be used while a replay's run is held open."""


def metric_families(s: dict[str, Any]) -> list[Any]:
    """``pouta_feedback_total{label=...}``: parts operators marked, by label."""
    from prometheus_client.core import CounterMetricFamily

    fam = CounterMetricFamily("pouta_feedback", "Parts operators marked in the live view", labels=["label"])
    for label in LABELS:
        fam.add_metric([label], float(s.get("counts", {}).get(label, 0)))
    return [fam]


def find_feedback(sinks: list[Any]) -> FeedbackSink | None:
    return next((s for s in sinks if isinstance(s, FeedbackSink)), None)
