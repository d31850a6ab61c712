"""Operator live view: a small web page served from the running pipeline (``--http HOST:PORT``).

The page shows the last part with its overlay, the verdict in large type with the
normalised score, counters, yield and fps over the last minutes, the last NG parts
(click for the full picture with its regions), camera/model/disk health, score drift,
model id and thresholds. ``/metrics`` serves the Prometheus metrics of
``pouta.edge.metrics``.

It can never slow inspection:

- ``LiveViewSink`` is a result sink in the fan-out (its own worker thread and queue)
  that keeps counters and the NG list. Pictures are taken on the writer side: its
  ``peek`` runs in the pipeline's write thread and only keeps a *reference* to the
  frame and map of a part the page will show (nothing is copied or encoded there), and
  only while someone watches (an open event stream, or an image fetched in the last few
  seconds); NG parts are kept for the strip either way. A render thread of its own
  draws and encodes at most ``max_fps`` pictures a second (the newest wins; skipped
  pictures are counted), so the cost is bounded whatever the line rate is.
- ``LiveServer`` runs aiohttp on its own thread and event loop. Updates go out as
  server-sent events through a bounded queue per client (a slow client loses
  intermediate states, never the newest); the picture is fetched by the page when an
  event says a new one exists, one fetch at a time.

Read-only by default: requests that change state (``POST /api/reload``: reload the
thresholds, like SIGHUP) need ``http.token`` as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import cv2
import numpy as np

from .errors import ConfigError
from .metrics import CONTENT_TYPE, MetricsSink
from .overlay import draw_overlay, to_bgr8
from .postprocess import NG, OK
from .sinks import NOT_INSPECTED, PartResult

log = logging.getLogger("pouta.edge.liveview")

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MAX_CLIENTS = 32
CLIENT_QUEUE = 4  # states per event-stream client; the oldest goes first when it is full
WATCH_GRACE_S = 3.0  # a polled picture keeps the page "watched" this long
THUMB_WIDTH = 192
JPEG_QUALITY = 85


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` / ``PORT``: all interfaces) -> (host, port)."""
    host, sep, port = str(value).rpartition(":")
    if not sep:
        host, port = "0.0.0.0", str(value)
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise ConfigError(f"http.listen: expected HOST:PORT, e.g. 0.0.0.0:8080, got {value!r}")
    return host.strip("[]") or "0.0.0.0", p


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


class _Health:
    """Camera/model/disk state from the pipeline's counters: 'warn' while a fault
    counter moved in the last minute, 'error' for a down disk or a stopped pipeline."""

    RECENT_S = 60.0

    def __init__(self, out_dir: str | None) -> None:
        self.out_dir = out_dir
        self._last: dict[str, float] = {}
        self._changed: dict[str, float] = {}

    def _moved(self, key: str, value: float, now: float) -> bool:
        if key in self._last and value != self._last[key]:
            self._changed[key] = now
        self._last[key] = value
        return now - self._changed.get(key, -1e9) < self.RECENT_S

    def __call__(self, s: dict[str, Any], running: bool) -> dict[str, Any]:
        now = time.monotonic()
        cam_keys = ("dropped", "corrupt", "timeouts", "reconnects")
        cam_moved = [k for k in cam_keys if self._moved(k, s.get(k, 0), now)]
        model_moved = self._moved("frame_errors", s.get("frame_errors", 0), now)
        disk_moved = self._moved("write_errors", s.get("write_errors", 0), now)
        free_gb = None
        if self.out_dir:
            with contextlib.suppress(OSError):
                free_gb = round(shutil.disk_usage(self.out_dir).free / 1e9, 2)
        infer = s.get("latency_ms", {}).get("infer", {})
        backlog = int(s.get("unsaved_in_memory", 0))
        disk = (
            "error" if backlog else "warn" if disk_moved or (free_gb is not None and free_gb < 1.0) else "ok"
        )
        return {
            "running": running,
            "camera": {
                "state": "ok" if running and not cam_moved else "warn" if running else "stopped",
                "recent": cam_moved,
                **{k: s.get(k, 0) for k in ("acquired", *cam_keys)},
                "fps_now": s.get("fps", 0.0),
            },
            "model": {
                "state": "warn" if model_moved else "ok",
                "errors": s.get("frame_errors", 0),
                "infer_ms_p50": infer.get("p50"),
                "infer_ms_p99": infer.get("p99"),
                "backend": s.get("backend"),
            },
            "disk": {
                "state": disk,
                "free_gb": free_gb,
                "write_errors": s.get("write_errors", 0),
                "backlog": backlog,
            },
        }


class LiveServer:
    """aiohttp on its own thread and event loop: the page, its event stream, pictures,
    ``/metrics``, ``/healthz``; ``POST /api/reload`` with the token."""

    def __init__(
        self,
        view: LiveViewSink,
        metrics: MetricsSink | None,
        status: Callable[[], dict[str, Any]],
        listen: str = "127.0.0.1:8080",
        token: str | None = None,
        reload: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"http: the live view needs aiohttp ({exc}); pip install 'pouta-edge[ui]'"
            ) from None
        self.view = view
        self.metrics = metrics
        self.status = status
        self.host, self.port = parse_listen(listen)
        self.token = token or None
        self.reload = reload
        self.static = {
            name: resources.files("pouta.edge").joinpath("liveview_static", name).read_bytes()
            for name in STATIC_FILES
        }
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._status: dict[str, Any] = {}
        self._status_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pouta-http", daemon=True)
        self._thread.start()
        self._ready.wait(30.0)
        if self._error is not None:
            raise ConfigError(
                f"http.listen {self.host}:{self.port}: cannot serve the live view ({self._error})"
            )
        log.info("live view on %s", self.url)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15.0)

    # -- loop --------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # pragma: no cover - reported through start()
            self._error = exc
            log.exception("live view server stopped: %s", exc)
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/frame.jpg", self._frame)
        app.router.add_get("/api/ng/{seq}.jpg", self._ng)
        app.router.add_get("/api/ng/{seq}/thumb.jpg", self._ng)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/api/reload", self._reload)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
        except OSError as exc:
            self._error = OSError(exc.strerror or str(exc))
            await runner.cleanup()
            self._ready.set()
            return
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        self._ready.set()
        ticker = asyncio.ensure_future(self._ticker())
        await self._stop.wait()
        ticker.cancel()
        for q in list(self._clients):
            self._offer(q, None)
        await runner.cleanup()

    def _offer(self, q: asyncio.Queue[bytes | None], msg: bytes | None) -> None:
        if q.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
        q.put_nowait(msg)

    async def _ticker(self) -> None:
        seen = -1
        while True:
            await asyncio.sleep(self.view.period)
            fresh = self._refresh_status()
            if self._clients and (fresh or self.view.version != seen):
                seen = self.view.version
                msg = b"event: state\ndata: " + json.dumps(self.state()).encode() + b"\n\n"
                for q in list(self._clients):
                    self._offer(q, msg)

    def _refresh_status(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._status_at < 1.0:
            return False
        self._status_at = now
        try:
            self._status = self.status()
        except Exception as exc:  # a failing status must not take the page down
            log.debug("live view status failed: %s", exc)
        if self.metrics is not None:
            self.metrics.drift.ratio()  # logs the drift warning even when nobody watches
        return True

    def state(self) -> dict[str, Any]:
        s = self.view.snapshot()
        s.update(self._status)
        s["drift"] = self.metrics.drift.snapshot() if self.metrics is not None else None
        s["read_only"] = self.token is None
        s["time"] = time.time()
        return s

    # -- handlers ----------------------------------------------------------
    async def _index(self, request: Any) -> Any:
        return self._file("index.html")

    async def _static(self, request: Any) -> Any:
        from aiohttp import web

        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> Any:
        from aiohttp import web

        return web.Response(
            body=self.static[name],
            content_type=STATIC_FILES[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _state(self, request: Any) -> Any:
        from aiohttp import web

        self._refresh_status(force=True)
        return web.json_response(self.state(), headers={"Cache-Control": "no-store"})

    async def _events(self, request: Any) -> Any:
        from aiohttp import web

        if len(self._clients) >= MAX_CLIENTS:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_CLIENTS} live view clients")
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self._clients.add(q)
        self.view.watchers = len(self._clients)
        try:
            self._refresh_status(force=not self._status)
            await resp.write(
                b"retry: 2000\nevent: state\ndata: " + json.dumps(self.state()).encode() + b"\n\n"
            )
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if msg is None:
                    break
                await resp.write(msg)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(q)
            self.view.watchers = len(self._clients)
        return resp

    async def _frame(self, request: Any) -> Any:
        from aiohttp import web

        self.view.touch()
        data, seq = self.view.picture, self.view.picture_seq
        if data is None:
            return web.Response(status=204, headers={"Cache-Control": "no-store"})
        return web.Response(
            body=data,
            content_type="image/jpeg",
            headers={"Cache-Control": "no-store", "X-Pouta-Seq": str(seq)},
        )

    async def _ng(self, request: Any) -> Any:
        from aiohttp import web

        try:
            seq = int(request.match_info["seq"])
        except ValueError:
            raise web.HTTPNotFound() from None
        data = self.view.ng_image(seq, thumb=request.path.endswith("/thumb.jpg"))
        if data is None:
            raise web.HTTPNotFound(text=f"no picture of NG part {seq} (only the last NG parts are kept)")
        return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are off")
        self._refresh_status()
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"ok": True, "finished": self.view.finished})

    async def _reload(self, request: Any) -> Any:
        from aiohttp import web

        if self.token is None:
            raise web.HTTPForbidden(text="read-only: set http.token to allow state changes")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise web.HTTPUnauthorized(text="wrong or missing token (Authorization: Bearer <http.token>)")
        if self.reload is None:
            raise web.HTTPNotImplemented(text="no reload available")
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, self.reload)
        except Exception as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        self._refresh_status(force=True)
        return web.json_response({"ok": True, **out})


def pipeline_status(pipe: Any, out_dir: str | None) -> Callable[[], dict[str, Any]]:
    """Model, thresholds and health of a running ``Pipeline``, for the page."""
    health = _Health(out_dir)

    def status() -> dict[str, Any]:
        s = pipe.summary()
        post = pipe.post
        thr = pipe.backend.metadata.thresholds
        return {
            "model": {
                "id": s["model_id"],
                "backend": s["backend"],
                "image_threshold": post.image_threshold,
                "pixel_threshold": post.pixel_threshold,
                "rule": thr.rule if thr is not None else "config",
            },
            "health": health(s, pipe.running),
        }

    return status


def attach_http(
    pipe: Any, cfg: dict[str, Any], reload: Callable[[], dict[str, Any]] | None = None
) -> LiveServer:
    """Adds the live view and metrics sinks to ``pipe`` (before ``start``) and starts the
    server; ``close()`` it after the pipeline has finished."""
    from .drift import ScoreDrift, calibration_median

    h = cfg["http"]
    drift = ScoreDrift(
        calibration_median(pipe.backend.metadata.thresholds),
        window=int(h["drift_window"]),
        warn_ratio=float(h["drift_warn_ratio"]),
    )
    metrics = MetricsSink(drift, summary=pipe.summary)
    view = LiveViewSink(
        max_fps=float(h["max_fps"]),
        image_width=int(h["image_width"]),
        ng_strip=int(h["ng_strip"]),
        window_min=float(h["window_min"]),
    )
    server = LiveServer(
        view,
        metrics,
        pipeline_status(pipe, cfg["output"]["dir"]),
        listen=str(h["listen"]),
        token=h["token"],
        reload=reload,
    )
    try:
        server.start()
    except BaseException:
        view.close()
        raise
    pipe.sinks.extend([view, metrics])
    return server
