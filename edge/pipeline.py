"""source -> preprocess -> backend -> postprocess -> sinks, in three threads.

Acquisition, inference and writing each have their own thread joined by bounded
queues, so a slow disk never stalls the camera. When the camera is faster than
inference, the frame queue applies the policy: ``drop-oldest`` (the newest part is the
one still in front of the camera) or ``block`` (back-pressure on the source). The result
queue always blocks: a verdict, once computed, is never dropped.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend
from .errors import ConfigError, ImageReadError
from .postprocess import PostProcessor
from .preprocess import Preprocessor
from .sinks import PartResult, ResultSink
from .sources import FrameSource, FrameTimeout

log = logging.getLogger("pouta.edge.pipeline")

POLICIES = ("drop-oldest", "block")
_END = object()  # end-of-stream marker passed down the queues


def percentile(values: collections.deque[float] | list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q))


FPS_WINDOW = 256  # parts: the live fps is measured over the last this many


@dataclass
class Stats:
    """Counters and latency windows, shared by the three threads (one lock)."""

    window: int = 4096
    started: float = field(default_factory=time.perf_counter)
    acquired: int = 0
    processed: int = 0
    written: int = 0
    ok: int = 0
    ng: int = 0
    dropped: int = 0
    corrupt: int = 0
    timeouts: int = 0
    reconnects: int = 0
    frame_errors: int = 0
    write_errors: int = 0
    labelled: int = 0
    correct: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    latency: dict[str, collections.deque[float]] = field(default_factory=dict, repr=False)
    _done_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=FPS_WINDOW)
    )

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def record(self, latency_ms: dict[str, float]) -> None:
        with self.lock:
            for k, v in latency_ms.items():
                self.latency.setdefault(k, collections.deque(maxlen=self.window)).append(v)
            self._done_times.append(time.perf_counter())

    def fps(self) -> float:
        with self.lock:
            t = list(self._done_times)
        if len(t) < 2:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = {k: (percentile(v, 50), percentile(v, 99)) for k, v in self.latency.items()}
            counts = {
                k: getattr(self, k)
                for k in (
                    "acquired",
                    "processed",
                    "written",
                    "ok",
                    "ng",
                    "dropped",
                    "corrupt",
                    "timeouts",
                    "reconnects",
                    "frame_errors",
                    "write_errors",
                    "labelled",
                    "correct",
                )
            }
        elapsed = time.perf_counter() - self.started
        return {
            **counts,
            "elapsed_s": round(elapsed, 3),
            "fps": round(self.fps(), 2),
            "mean_fps": round(counts["processed"] / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms": {k: {"p50": round(a, 3), "p99": round(b, 3)} for k, (a, b) in lat.items()},
            "accuracy": round(counts["correct"] / counts["labelled"], 4) if counts["labelled"] else None,
        }

    def status_line(self) -> str:
        s = self.snapshot()
        tot = s["latency_ms"].get("total", {"p50": 0.0, "p99": 0.0})
        line = (
            f"{s['processed']} parts  {s['fps']:.1f} fps  latency p50 {tot['p50']:.1f} ms "
            f"p99 {tot['p99']:.1f} ms  OK {s['ok']} NG {s['ng']}  dropped {s['dropped']}"
        )
        extra = [
            f"{k.replace('_', ' ')} {s[k]}"
            for k in ("corrupt", "timeouts", "reconnects", "frame_errors", "write_errors")
            if s[k]
        ]
        return line + ("  " + "  ".join(extra) if extra else "")


class FrameQueue:
    """Bounded queue with a full-queue policy; counts what it drops."""

    def __init__(self, maxsize: int, policy: str, stats: Stats) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"pipeline.policy: expected one of {POLICIES}, got {policy!r}")
        if maxsize < 1:
            raise ConfigError(f"pipeline.queue_size: expected >= 1, got {maxsize}")
        self.q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.policy = policy
        self.stats = stats

    def put(self, item: Any, stop: threading.Event) -> None:
        if item is _END or self.policy == "block":
            while True:
                try:
                    self.q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    # The end marker must get through even after stop(); frames need not.
                    if stop.is_set() and item is not _END:
                        self.stats.add(dropped=1)
                        return
        while True:
            try:
                self.q.put_nowait(item)
                return
            except queue.Full:
                try:
                    self.q.get_nowait()
                    self.stats.add(dropped=1)
                except queue.Empty:
                    pass

    def get(self) -> Any:
        return self.q.get()


class Pipeline:
    """Wires one source, preprocessor, backend, postprocessor and sink; ``run`` blocks."""

    def __init__(
        self,
        source: FrameSource,
        preprocessor: Preprocessor,
        backend: Backend,
        postprocessor: PostProcessor,
        sink: ResultSink | None,
        queue_size: int = 4,
        policy: str = "drop-oldest",
        result_queue_size: int = 64,
        max_frames: int | None = None,
        duration: float | None = None,
        keep_results: int = 0,
    ) -> None:
        self.source = source
        self.pre = preprocessor
        self.backend = backend
        self.post = postprocessor
        self.sink = sink
        self.max_frames = max_frames
        self.duration = duration
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.frames = FrameQueue(queue_size, policy, self.stats)
        self.results: queue.Queue[Any] = queue.Queue(maxsize=max(1, result_queue_size))
        self.model_id = backend.metadata.model_id
        # Kept in memory for callers (tests, benchmarks); 0 keeps none.
        self.recent: collections.deque[PartResult] = collections.deque(maxlen=keep_results or None)
        self._keep = keep_results > 0
        self.fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []
        if hasattr(source, "stop_event"):
            source.stop_event = self.stop_event  # type: ignore[attr-defined]

    # -- control -----------------------------------------------------------
    def stop(self) -> None:
        """Ask for a clean shutdown: acquisition stops, queued frames are still judged and written."""
        self.stop_event.set()

    def start(self) -> None:
        self.source.open()
        self.stats.started = time.perf_counter()
        for name, fn in (
            ("pouta-acquire", self._acquire_loop),
            ("pouta-infer", self._infer_loop),
            ("pouta-write", self._write_loop),
        ):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def run(self) -> dict[str, Any]:
        self.start()
        self.join()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s = self.stats.snapshot()
        s["reconnects"] = max(s["reconnects"], int(getattr(self.source, "reconnects", 0)))
        s["model_id"] = self.model_id
        s["backend"] = self.backend.name
        s["unsaved_in_memory"] = int(getattr(self.sink, "backlog", 0))
        return s

    # -- threads -----------------------------------------------------------
    def _acquire_loop(self) -> None:
        stop = self.stop_event
        deadline = time.monotonic() + self.duration if self.duration else None
        n = 0
        try:
            while not stop.is_set():
                if self.max_frames is not None and n >= self.max_frames:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    frame = self.source.read()
                except ImageReadError as exc:
                    self.stats.add(corrupt=1)
                    log.warning("skipped corrupt frame: %s", exc)
                    continue
                except FrameTimeout as exc:
                    self.stats.add(timeouts=1)
                    log.debug("%s", exc)
                    continue
                except Exception as exc:
                    self.stats.add(frame_errors=1)
                    log.exception("acquisition failed for one frame: %s", exc)
                    # A source that fails on every call must not spin a core.
                    stop.wait(0.05)
                    continue
                if frame is None:
                    break
                n += 1
                self.stats.add(acquired=1)
                self.frames.put(frame, stop)
        except BaseException as exc:  # pragma: no cover - last resort, keeps shutdown orderly
            self.fatal = exc
            log.exception("acquisition thread stopped: %s", exc)
        finally:
            reconnects = int(getattr(self.source, "reconnects", 0))
            with self.stats.lock:
                self.stats.reconnects = max(self.stats.reconnects, reconnects)
            try:
                self.source.close()
            except Exception as exc:
                log.warning("closing the source failed: %s", exc)
            self.frames.put(_END, stop)

    def _infer_loop(self) -> None:
        pre, backend, post = self.pre, self.backend, self.post
        while True:
            frame = self.frames.get()
            if frame is _END:
                break
            try:
                t0 = time.perf_counter()
                x = pre(frame.image, frame.color_order)[None]
                t1 = time.perf_counter()
                amap, score = backend.run(x)
                t2 = time.perf_counter()
                verdict = post(amap[0, 0], float(score[0]), frame.image.shape)
                t3 = time.perf_counter()
            except Exception as exc:
                self.stats.add(frame_errors=1)
                log.exception("frame %s failed: %s", getattr(frame, "frame_id", "?"), exc)
                continue
            lat = {
                "queue": (t0 - frame.acquired) * 1e3,
                "preprocess": (t1 - t0) * 1e3,
                "infer": (t2 - t1) * 1e3,
                "postprocess": (t3 - t2) * 1e3,
                "total": (t3 - frame.acquired) * 1e3,
            }
            result = PartResult(frame, verdict, self.model_id, lat, amap_to_source=pre.map_to_source)
            counts = {"processed": 1, "ok": int(not verdict.is_ng), "ng": int(verdict.is_ng)}
            if frame.label is not None:
                counts["labelled"] = 1
                counts["correct"] = int(frame.label == verdict.verdict)
            self.stats.add(**counts)
            self.stats.record(lat)
            self.results.put(result)
        self.results.put(_END)

    def _write_loop(self) -> None:
        while True:
            result = self.results.get()
            if result is _END:
                break
            if self._keep:
                self.recent.append(result)
            if self.sink is None:
                continue
            try:
                t0 = time.perf_counter()
                ok = self.sink.write(result)
                self.stats.record({"write": (time.perf_counter() - t0) * 1e3})
                self.stats.add(write_errors=int(not ok))
                self._sync_written()
            except Exception as exc:
                self.stats.add(write_errors=1)
                log.exception("writing results of frame %s failed: %s", result.frame.frame_id, exc)
        if self.sink is not None:
            try:
                self.sink.close()
                self._sync_written()
            except Exception as exc:
                log.exception("closing the result writer failed: %s", exc)

    def _sync_written(self) -> None:
        # The sink may write a backlog of earlier parts in one call: its own count is the truth.
        with self.stats.lock:
            self.stats.written = int(getattr(self.sink, "written", self.stats.written))
