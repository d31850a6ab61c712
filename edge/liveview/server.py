"""The live view's HTTP side: aiohttp on its own thread and event loop (see ``page``).

Updates go out as server-sent events through a bounded queue per client (a slow client
loses intermediate states, never the newest); the picture is fetched by the page when an
event says a new one exists, one fetch at a time. Read-only by default: requests that
change state (``POST /api/reload``, ``POST /api/promote``, ``POST /api/feedback``) need the token as ``Authorization: Bearer``. Bound
beyond loopback, every request but ``/healthz`` needs the token (header, or the cookie a
browser gets from opening ``/?token=...`` once) and a token must be configured; with
``tls_cert``/``tls_key`` the page is served over HTTPS.

Longer than ~350 lines on purpose: one aiohttp application whose routes, event
fan-out and token check share its loop and bounded queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ..auth import read_secret
from ..contract.errors import ConfigError, UnavailableError
from ..contract.metadata import operating_point_line
from ..sinks.shadow import find_shadow, promote
from .feedback import FeedbackRefused, FeedbackSink
from .metrics import CONTENT_TYPE, MetricsSink
from .page import LiveViewSink, is_loopback, parse_listen

log = logging.getLogger("pouta.edge.liveview")

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MAX_CLIENTS = 32
COOKIE = "pouta_token"
OPEN_PATHS = frozenset({"/healthz"})
CLIENT_QUEUE = 4  # states per event-stream client; the oldest goes first when it is full


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
    ``/metrics``, ``/healthz``; ``POST /api/reload`` and ``POST /api/promote`` with the token."""

    def __init__(
        self,
        view: LiveViewSink,
        metrics: MetricsSink | None,
        status: Callable[[], dict[str, Any]],
        listen: str = "127.0.0.1:8080",
        token: str | None = None,
        reload: Callable[[], dict[str, Any]] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        require_token: bool | None = None,
        report: Callable[[], Path | None] | None = None,
        promote: Callable[[], tuple[bool, str]] | None = None,
        feedback: FeedbackSink | None = None,
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
        # Beyond loopback, product images and metrics are for people holding the token.
        self.private = not is_loopback(self.host) if require_token is None else bool(require_token)
        if self.private and self.token is None:
            raise ConfigError(
                f"http.token_file: a token is required (http.listen {self.host} is beyond loopback, or "
                "http.require_token is set); give token_file or token_env"
            )
        self.ssl: Any = None
        if tls_cert or tls_key:
            import ssl

            if not (tls_cert and tls_key):
                raise ConfigError("http.tls_cert/tls_key: give both or neither")
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(str(tls_cert), str(tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"http.tls_cert/tls_key: cannot load {tls_cert} / {tls_key} ({exc})"
                ) from None
            self.ssl = ctx
        self.reload = reload
        self.report = report  # the live model's operating-point page, when it has one
        self.promote = promote  # swap in the shadow model (as ``pouta-edge promote``)
        self.feedback = feedback  # operators' false rejects / missed defects -> feedback/
        self.static = {
            name: resources.files("pouta.edge.liveview").joinpath("static", name).read_bytes()
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
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pouta-http", daemon=True)
        self._thread.start()
        self._ready.wait(30.0)
        if self._error is not None:
            raise UnavailableError(
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
        app = web.Application(middlewares=[self._middleware()])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/frame.jpg", self._frame)
        app.router.add_get("/api/ng/{seq}.jpg", self._ng)
        app.router.add_get("/api/ng/{seq}/thumb.jpg", self._ng)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/oppoint.html", self._oppoint)
        app.router.add_post("/api/reload", self._reload)
        app.router.add_post("/api/promote", self._promote)
        app.router.add_post("/api/feedback", self._feedback)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl)
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
        s["feedback"] = self.feedback.summary() if self.feedback is not None else None
        s["read_only"] = self.token is None
        s["time"] = time.time()
        return s

    # -- handlers ----------------------------------------------------------
    def _token_ok(self, request: Any) -> bool:
        if self.token is None:
            return False
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        given = given or request.cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _middleware(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def auth(request: Any, handler: Any) -> Any:
            if not self.private or request.path in OPEN_PATHS:
                return await handler(request)
            query = request.query.get("token")
            if (
                query is not None
                and self.token is not None
                and hmac.compare_digest(query.encode(), self.token.encode())
            ):
                # A browser opens /?token=... once; the cookie carries it from then on.
                resp = web.HTTPFound(request.path)
                resp.set_cookie(
                    COOKIE, self.token, httponly=True, samesite="Strict", secure=self.ssl is not None
                )
                raise resp
            if not self._token_ok(request):
                raise web.HTTPUnauthorized(
                    text="token required (Authorization: Bearer <token>, or open /?token=...)"
                )
            return await handler(request)

        return auth

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

    async def _oppoint(self, request: Any) -> Any:
        from aiohttp import web

        page = self.report() if self.report is not None else None
        if page is None or not page.is_file():
            raise web.HTTPNotFound(
                text="the live model has no operating-point report (calibrate with --holdout)"
            )
        return web.Response(body=page.read_bytes(), content_type="text/html", charset="utf-8")

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

    def _authorise(self, request: Any) -> None:
        from aiohttp import web

        if self.token is None:
            raise web.HTTPForbidden(text="read-only: set http.token_file or token_env to allow state changes")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise web.HTTPUnauthorized(text="wrong or missing token (Authorization: Bearer <token>)")

    async def _promote(self, request: Any) -> Any:
        from aiohttp import web

        self._authorise(request)
        if self.promote is None:
            raise web.HTTPNotImplemented(text="no promotion available")
        ok, message = self.promote()
        return web.json_response({"ok": ok, "message": message}, status=200 if ok else 409)

    async def _feedback(self, request: Any) -> Any:
        """``{"seq": N, "label": "false_reject"|"missed", "reason": "scratch"}``: file that
        part's judged frame under ``feedback/`` (see ``pouta.edge.liveview.feedback``)."""
        from aiohttp import web

        self._authorise(request)
        if self.feedback is None:
            raise web.HTTPNotImplemented(text="feedback needs an output folder (output.dir)")
        try:
            body = await request.json()
            seq, label = body["seq"], str(body["label"])
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError("seq")
            reason = body.get("reason")
            reason = None if reason is None else str(reason)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise web.HTTPBadRequest(
                text='expected JSON {"seq": <part number>, "label": "false_reject" or "missed", "reason": "..."}'
            ) from None
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                None, self.feedback.mark, seq, label, reason
            )
        except FeedbackRefused as exc:
            return web.Response(status=exc.status, text=str(exc))
        self._refresh_status(force=True)
        return web.json_response({"ok": True, **out})

    async def _reload(self, request: Any) -> Any:
        from aiohttp import web

        self._authorise(request)
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
            "fault": s["fault"],
            "model": {
                "id": s["model_id"],
                "backend": s["backend"],
                "image_threshold": post.image_threshold,
                "pixel_threshold": post.pixel_threshold,
                "rule": thr.rule if thr is not None else "config",
                "operating_point": operating_point_line(thr, post.image_threshold),
                "report": report_file(pipe) is not None,
            },
            "shadow": shadow.summary() if shadow is not None else None,
            "health": health(s, pipe.running),
        }

    shadow = find_shadow(pipe.sinks)
    return status


def report_file(pipe: Any) -> Path | None:
    """The operating-point page written beside the live model's artifact, if it exists."""
    thr = pipe.backend.metadata.thresholds
    name = (thr.operating_point or {}).get("report") if thr is not None else None
    path = getattr(pipe.backend, "path", None)
    if not name or path is None:
        return None
    page = Path(path).with_name(Path(name).name)  # a name from the sidecar, never a path
    return page if page.is_file() else None


def attach_http(
    pipe: Any, cfg: dict[str, Any], reload: Callable[[], dict[str, Any]] | None = None
) -> LiveServer:
    """Adds the live view and metrics sinks to ``pipe`` (before ``start``) and starts the
    server; ``close()`` it after the pipeline has finished."""
    from ..drift import ScoreDrift, calibration_median

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
    out_dir = cfg["output"]["dir"]
    feedback = FeedbackSink(Path(out_dir) / "feedback", keep=int(h["feedback_frames"])) if out_dir else None
    server = LiveServer(
        view,
        metrics,
        pipeline_status(pipe, cfg["output"]["dir"]),
        listen=str(h["listen"]),
        token=read_secret("http.token", h["token"], h["token_file"], h["token_env"]),
        reload=reload,
        tls_cert=h["tls_cert"],
        tls_key=h["tls_key"],
        require_token=h["require_token"],
        report=lambda: report_file(pipe),
        promote=lambda: promote(pipe),
        feedback=feedback,
    )
    try:
        server.start()
    except BaseException:
        view.close()
        raise
    pipe.sinks.extend([view, metrics, *([feedback] if feedback is not None else [])])
    return server
