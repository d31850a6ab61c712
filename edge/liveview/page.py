"""Operator live view: a small web page served from the running pipeline (``--http HOST:PORT``).

The page shows the last part with its overlay, the verdict in large type with the
normalised score, counters, yield and fps over the last minutes, the last NG parts
(click for the full picture with its regions), camera/model/disk health, score drift,
model id and thresholds. ``/metrics`` serves the Prometheus metrics of
``pouta.edge.liveview.metrics``.

It can never slow inspection:

- ``LiveViewSink`` is a result sink in the fan-out (its own worker thread and queue)
  that keeps counters and the NG list. Pictures are taken on the writer side: its
  ``peek`` runs in the pipeline's write thread and only keeps a *reference* to the
  frame and map of a part the page will show (nothing is copied or encoded there), and
  only while someone watches (an open event stream, or an image fetched in the last few
  seconds); NG parts are kept for the strip either way. A render thread of its own
  draws and encodes at most ``max_fps`` pictures a second (the newest wins; skipped
  pictures are counted), so the cost is bounded whatever the line rate is.
- ``server.LiveServer`` runs aiohttp on its own thread and event loop. Updates go out as
  server-sent events through a bounded queue per client (a slow client loses
  intermediate states, never the newest); the picture is fetched by the page when an
  event says a new one exists, one fetch at a time.

Read-only by default: requests that change state (``POST /api/reload``: reload the
thresholds, like SIGHUP) need the token (``http.token_file``/``token_env``) as
``Authorization: Bearer <token>``. Bound beyond loopback, every request except
``/healthz`` needs it (a browser opens ``/?token=...`` once and gets a cookie).

Longer than ~350 lines on purpose: one sink class whose counters, picture hand-off and
render thread share one lock; the HTTP side is in ``server``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..contract.errors import ConfigError
from ..contract.overlay import draw_overlay, to_bgr8
from ..postprocess import NG, NOT_INSPECTED, OK
from ..sinks.records import PartResult

log = logging.getLogger("pouta.edge.liveview")

WATCH_GRACE_S = 3.0  # a polled picture keeps the page "watched" this long
THUMB_WIDTH = 192
JPEG_QUALITY = 85


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` / ``PORT``: loopback only) -> (host, port)."""
    host, sep, port = str(value).rpartition(":")
    if not sep:
        host, port = "127.0.0.1", str(value)
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise ConfigError(f"http.listen: expected HOST:PORT, e.g. 0.0.0.0:8080, got {value!r}")
    return host.strip("[]") or "127.0.0.1", p


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Picture:
    """References to one part's frame and map, taken in the write thread (no copies)."""

    seq: int
    verdict: str
    score: float
    score_norm: float | None
    pixel_threshold: float
    image: np.ndarray
    amap: np.ndarray | None
    geometry: Any  # FrameGeometry: maps the work-size map back onto the frame
    color_order: str


@dataclass
class _NgPicture:
    record: dict[str, Any]
    thumb: bytes | None = None
    full: bytes | None = None


def _jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the live picture as JPEG")
    return buf.tobytes()


def _slim_record(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("seq", "part_id", "verdict", "reject", "reason", "score", "score_norm", "threshold")
    out = {k: d[k] for k in keys}
    out.update(
        time=d["wall_time_iso"],
        regions=d["regions"],
        image_size=d["image_size"],
        latency_ms=d["latency_ms"].get("total"),
        label=d["label"],
    )
    return out


class LiveViewSink:
    """Result sink feeding the page: counters and windows in ``write`` (its fan-out
    thread), frame references in ``peek`` (write thread), drawing in a thread of its own."""

    name = "liveview"
    needs_images = False  # pictures come through ``peek``; the fan-out never holds frames for it

    def __init__(
        self,
        max_fps: float = 8.0,
        image_width: int = 960,
        ng_strip: int = 20,
        window_min: float = 5.0,
    ) -> None:
        if max_fps <= 0 or image_width < 64 or ng_strip < 1 or window_min <= 0:
            raise ConfigError(
                "http: expected max_fps > 0, image_width >= 64, ng_strip >= 1, window_min > 0; got "
                f"{max_fps}, {image_width}, {ng_strip}, {window_min}"
            )
        self.period = 1.0 / float(max_fps)
        self.image_width = int(image_width)
        self.window_s = 60.0 * float(window_min)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.counts = {OK: 0, NG: 0, NOT_INSPECTED: 0}
        self._window: collections.deque[tuple[float, str]] = collections.deque()
        self._win = {OK: 0, NG: 0, NOT_INSPECTED: 0}
        self._first_part: float | None = None
        self.last: dict[str, Any] | None = None
        self.version = 0  # bumps on every change the page should see
        # Pictures waiting for the render thread: the newest live one, and NG parts.
        self._pending: _Picture | None = None
        self._pending_ng: collections.deque[_Picture] = collections.deque(maxlen=int(ng_strip))
        self._next_render = 0.0
        self.ng: collections.deque[_NgPicture] = collections.deque(maxlen=int(ng_strip))
        self._ng_records: dict[int, dict[str, Any]] = {}
        self.picture: bytes | None = None
        self.picture_seq: int | None = None
        self.picture_version = 0
        self.watchers = 0  # open event streams (set by the server)
        self._watched_until = 0.0
        self.rendered = 0
        self.skipped = 0  # live pictures replaced before they were drawn
        self.unwatched = 0  # parts whose picture nobody was watching (not taken at all)
        self.render_errors = 0
        self.finished = False
        self._closing = False
        self._thread = threading.Thread(target=self._render_loop, name="pouta-liveview-render", daemon=True)
        self._thread.start()

    # -- watching ----------------------------------------------------------
    def touch(self) -> None:
        """A picture was fetched: keep taking pictures for a while."""
        self._watched_until = time.monotonic() + WATCH_GRACE_S

    def watched(self, now: float | None = None) -> bool:
        return self.watchers > 0 or (now if now is not None else time.monotonic()) < self._watched_until

    # -- write thread ------------------------------------------------------
    def peek(self, result: PartResult) -> None:
        """Called in the pipeline's write thread before the record is queued: keep
        references for a picture the page will show; return at once, never raise."""
        try:
            v = result.verdict
            if v is None or not result.has_image:
                return
            ng = v.is_ng
            live = self.watched()
            if not (ng or live):
                self.unwatched += 1
                return
            pic = _Picture(
                result.seq,
                v.verdict,
                v.score,
                result.score_norm,
                v.pixel_threshold,
                result.frame.image,
                v.anomaly_map,
                getattr(v, "geometry", None),
                result.frame.color_order,
            )
            with self._cond:
                if live:
                    if self._pending is not None:
                        self.skipped += 1
                    self._pending = pic
                if ng:
                    self._pending_ng.append(pic)
                self._cond.notify()
        except Exception as exc:  # the page must never cost a part its record
            log.debug("live view could not take part %s: %s", getattr(result, "seq", "?"), exc)

    # -- fan-out thread ----------------------------------------------------
    def write(self, result: PartResult) -> bool:
        d = result.to_dict()
        status = d["verdict"]
        now = time.monotonic()
        rec = _slim_record(d)
        with self._lock:
            self.counts[status] += 1
            if self._first_part is None:
                self._first_part = now
            self._window.append((now, status))
            self._win[status] += 1
            self._expire(now)
            self.last = rec
            if status == NG:
                self._ng_records[d["seq"]] = rec
                # NG parts without a picture (dropped by nobody) still belong in the strip.
                if not any(p.record["seq"] == d["seq"] for p in self.ng):
                    self._add_ng(_NgPicture(rec))
            self.version += 1
        return True

    def _add_ng(self, item: _NgPicture) -> None:
        if len(self.ng) == self.ng.maxlen:
            old = self.ng.popleft()
            self._ng_records.pop(old.record["seq"], None)
        self.ng.append(item)

    def _expire(self, now: float) -> None:
        while self._window and now - self._window[0][0] > self.window_s:
            _, s = self._window.popleft()
            self._win[s] -= 1

    # -- render thread -----------------------------------------------------
    def _render_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = self._pending is not None and now >= self._next_render
                    if self._pending_ng or due or (self._closing and self._pending is None):
                        break
                    wait = None if self._pending is None else max(0.0, self._next_render - now)
                    self._cond.wait(wait)
                if self._closing and self._pending is None and not self._pending_ng:
                    return
                ngs = list(self._pending_ng)
                self._pending_ng.clear()
                live = self._pending if due or self._closing else None
                if live is not None:
                    self._pending = None
                    self._next_render = now + self.period
            try:
                self._render(live, ngs)
            except Exception as exc:
                self.render_errors += 1
                log.warning("live view picture failed: %s", exc)

    def _overlay(self, pic: _Picture) -> np.ndarray:
        base = to_bgr8(pic.image, pic.color_order)
        h, w = base.shape[:2]
        scale = min(1.0, self.image_width / w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 1.0:
            base = cv2.resize(base, size, interpolation=cv2.INTER_AREA)
        if pic.amap is None:
            return base
        amap = pic.geometry.to_source(pic.amap) if pic.geometry is not None else pic.amap
        amap = cv2.resize(np.asarray(amap, np.float32), size, interpolation=cv2.INTER_LINEAR)
        norm = f"  {pic.score_norm:.2f}x" if pic.score_norm is not None else ""
        return draw_overlay(
            base,
            amap,
            pic.verdict,
            pic.score,
            pic.pixel_threshold,
            "BGR",
            label=[f"#{pic.seq} {pic.verdict}{norm}"],
        )

    def _render(self, live: _Picture | None, ngs: list[_Picture]) -> None:
        drawn: dict[int, np.ndarray] = {}
        if live is not None:
            drawn[live.seq] = self._overlay(live)
            data = _jpeg(drawn[live.seq])
            with self._lock:
                self.picture, self.picture_seq = data, live.seq
                self.picture_version += 1
                self.rendered += 1
                self.version += 1
        for pic in ngs:
            img = drawn.get(pic.seq)
            if img is None:
                img = self._overlay(pic)
            th = max(1, round(img.shape[0] * THUMB_WIDTH / img.shape[1]))
            thumb = _jpeg(cv2.resize(img, (THUMB_WIDTH, th), interpolation=cv2.INTER_AREA), 80)
            full = _jpeg(img)
            with self._lock:
                item = next((p for p in self.ng if p.record["seq"] == pic.seq), None)
                if item is None:
                    # The picture can be drawn before the record reaches this sink's thread.
                    rec = {"seq": pic.seq, "verdict": NG, "score_norm": pic.score_norm}
                    item = _NgPicture(rec)
                    self._add_ng(item)
                    self.ng = collections.deque(
                        sorted(self.ng, key=lambda p: p.record["seq"]), self.ng.maxlen
                    )
                item.thumb, item.full = thumb, full
                self.version += 1

    # -- readers (HTTP thread) ---------------------------------------------
    def ng_image(self, seq: int, thumb: bool) -> bytes | None:
        with self._lock:
            for p in self.ng:
                if p.record["seq"] == seq:
                    return p.thumb if thumb else p.full
        return None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            n = sum(self._win.values())
            span = min(self.window_s, now - self._first_part) if self._first_part is not None else 0.0
            parts = sum(self.counts.values())
            ng = []
            for p in reversed(self.ng):
                rec = self._ng_records.get(p.record["seq"], p.record)
                p.record = rec
                ng.append({**rec, "thumb": p.thumb is not None})
            return {
                "counts": {"parts": parts, **self.counts},
                "yield": round(self.counts[OK] / parts, 4) if parts else None,
                "window": {
                    "minutes": self.window_s / 60.0,
                    "parts": n,
                    **self._win,
                    "yield": round(self._win[OK] / n, 4) if n else None,
                    "fps": round(n / span, 2) if span > 0 else 0.0,
                },
                "last": self.last,
                "ng": ng,
                "picture": {"seq": self.picture_seq, "version": self.picture_version},
                "finished": self.finished,
                "view": {
                    "watchers": self.watchers,
                    "rendered": self.rendered,
                    "skipped": self.skipped,
                    "unwatched": self.unwatched,
                },
            }

    def stats(self) -> dict[str, Any]:
        return {"rendered": self.rendered, "skipped": self.skipped, "render_errors": self.render_errors}

    def close(self) -> None:
        """End of input: draw what is pending; the page stays up (the server owns it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(10.0)
        with self._lock:
            self.finished = True
            self.version += 1
