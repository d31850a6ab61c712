"""source -> preprocess -> backend -> postprocess -> sinks, in threads joined by queues.

Acquisition, inference and result fan-out each have their own thread, and every sink
has its own worker thread (``sinks.fanout``), so a slow disk or a lost broker never stalls the
camera or the other sinks. When the camera is faster than inference, the frame queue
applies the policy: ``drop-oldest`` (the newest part is the one still in front of the
camera) or ``block`` (back-pressure on the source).

Every part the camera saw gets exactly one record, in sequence order: a judged part is
``OK``/``NG``; a dropped frame, a corrupt frame, a failed inference or a timeout after a
trigger is ``NOT_INSPECTED`` (rejected by default: fail-safe). Sequence numbers come
from a persistent counter and are assigned at acquisition.

Fail-safe by construction: a part is OK only when a finite score was compared with a
finite threshold (``postprocess``). A NaN/inf output, a backend that raises, a camera
that stops delivering and a verdict that does not come within ``verdict_timeout_s`` of
acquisition (the watchdog) each record the parts concerned ``NOT_INSPECTED`` and raise
the fault state (``fault``; ``ready`` drops) that every sink's heartbeat carries to the
PLC (Modbus status bit 4, OPC UA ``Status/Fault``), MQTT, the live view and metrics. The
fault clears when verdicts (or frames) flow again. Every record goes out through
``_emit``, which drops a second record for a sequence number already recorded (a
verdict that comes after the watchdog recorded its part), so each part has exactly one.

Longer than ~350 lines on purpose: one class whose threads (acquire, infer, fan-out,
heartbeat) share the ordering rules (sequence numbers, records of dropped parts) and the
shutdown order, which are easiest to check in one file; counters are in ``stats``, the
queue in ``frame_queue``.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .backends.protocol import Backend
from .contract.errors import ConfigError, ImageReadError
from .contract.preprocess import Preprocessor
from .frame_queue import END, FrameQueue, PendingPart
from .postprocess import NOT_INSPECTED, NonFiniteOutput, PostProcessor
from .sequence import SequenceCounter, SequenceError
from .sinks.fanout import SinkWorker
from .sinks.records import PartResult, ResultSink, clean_part_id, utc_iso
from .sinks.shadow import ModelSlot
from .sources.protocol import Frame, FrameSource, FrameTimeout, signal_verdict
from .stats import Stats, percentile, status_line

log = logging.getLogger("pouta.edge.pipeline")

# Faults of the verdict path: cleared by the next part judged in time.
VERDICT_FAULTS = ("verdict_timeout", "inference_error", "non_finite_score")
# A sink's counters of records that never reached it (queue, backlog, buffer, exit).
LOST_KEYS = (
    "dropped",
    "backlog_dropped",
    "buffer_dropped",
    "lost_at_close",
    "unwritten_at_close",
    "unacked_at_close",
)
# Faults of the source: cleared by the next frame.
SOURCE_FAULTS = ("no_frame", "source_error")


class Pipeline:
    """Wires one source, preprocessor, backend, postprocessor and any number of sinks;
    ``run`` blocks."""

    def __init__(
        self,
        source: FrameSource,
        preprocessor: Preprocessor,
        backend: Backend,
        postprocessor: PostProcessor,
        sink: ResultSink | Sequence[ResultSink] | None,
        queue_size: int = 4,
        policy: str = "drop-oldest",
        result_queue_size: int = 64,
        max_frames: int | None = None,
        duration: float | None = None,
        keep_results: int = 0,
        sequence: SequenceCounter | None = None,
        not_inspected_is_ng: bool = True,
        heartbeat_s: float = 1.0,
        sink_queue: int = 100000,
        close_timeout_s: float = 30.0,
        verdict_timeout_s: float | None = None,
    ) -> None:
        self.source = source
        self.pre = preprocessor
        self.backend = backend
        self.post = postprocessor
        self.sinks: list[ResultSink] = (
            [] if sink is None else list(sink) if isinstance(sink, list | tuple) else [sink]
        )  # type: ignore[list-item]
        self.max_frames = max_frames
        self.duration = duration
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.sequence = sequence if sequence is not None else SequenceCounter(None)
        self.not_inspected_is_ng = not_inspected_is_ng
        self.heartbeat_s = float(heartbeat_s)
        self.sink_queue = int(sink_queue)
        self.close_timeout_s = float(close_timeout_s)
        if verdict_timeout_s is not None and not verdict_timeout_s > 0:
            raise ConfigError(
                f"pipeline.verdict_timeout_s: expected > 0 seconds or null, got {verdict_timeout_s}"
            )
        self.verdict_timeout_s = verdict_timeout_s
        # Held while a record is emitted and while the watchdog decides: see _emit.
        self._emit_lock = threading.RLock()
        self._last_emitted: int | None = None
        self._current: PendingPart | None = None  # the part the inference thread is judging
        self._fault_lock = threading.Lock()
        self._faults: dict[str, str] = {}
        self._beat_now = threading.Event()
        self.unnumbered = 0  # parts seen while the sequence counter could not be saved
        # When the inference thread last came round its loop (systemd's watchdog pings on it).
        self.progress_at = time.monotonic()
        self.frames = FrameQueue(queue_size, policy, self.stats, on_drop=self._on_drop)
        self.results: queue.Queue[Any] = queue.Queue(maxsize=max(1, result_queue_size))
        self.model_id = backend.metadata.model_id
        # A shadow promotion waiting for the next part (``request_swap``).
        self._swap: Callable[[ModelSlot], ModelSlot] | None = None
        # Dropped parts wait here so that their records go out in sequence order.
        self._dropped: collections.deque[PendingPart] = collections.deque()
        # Kept in memory for callers (tests, benchmarks); 0 keeps none.
        self.recent: collections.deque[PartResult] = collections.deque(maxlen=keep_results or None)
        self._keep = keep_results > 0
        self.workers: list[SinkWorker] = []
        self.fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._aux_threads: list[threading.Thread] = []
        self._inflight = 0
        self._done = threading.Event()
        self._closed = False
        source.stop_event = self.stop_event

    @property
    def sink(self) -> ResultSink | None:
        """The first sink (the files, when configured)."""
        return self.sinks[0] if self.sinks else None

    @sink.setter
    def sink(self, value: ResultSink | None) -> None:
        self.sinks = [] if value is None else [value]

    # -- lifetime: the pipeline owns its source, backend and sinks -----------
    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop, flush, and release sinks, backend and source, in reverse order of building.

        Idempotent. After a run the worker threads have already closed the source and the
        sinks; a pipeline that never started closes them here.
        """
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.join(self.close_timeout_s)
        # Heartbeat and watchdog end once the records are out; nothing writes after close.
        for t in self._aux_threads:
            t.join(5.0)
        if not any(t.is_alive() for t in self._threads[:1]):
            # Acquisition has ended: no more numbers; the next run continues from here.
            self.sequence.close()
        parts: list[Any] = [] if self.workers else list(reversed(self.sinks))
        parts.append(self.backend)
        if not self._threads:
            parts.append(self.source)
        for part in parts:
            try:
                part.close()
            except Exception as exc:
                log.warning("closing %s failed: %s", type(part).__name__, exc)

    # -- control -----------------------------------------------------------
    def stop(self) -> None:
        """Ask for a clean shutdown: acquisition stops, queued frames are still judged and written."""
        self.stop_event.set()

    def request_swap(self, exchange: Callable[[ModelSlot], ModelSlot]) -> None:
        """Swap the live model between two parts: before the next part is judged,
        ``exchange(current)`` returns the model that judges it (shadow promotion)."""
        self._swap = exchange

    def _apply_swap(self) -> None:
        exchange, self._swap = self._swap, None
        if exchange is None:
            return
        new = exchange(ModelSlot(self.pre, self.backend, self.post))
        log.warning("model change: %s -> %s", self.model_id, new.model_id)
        self.pre, self.backend, self.post, self.model_id = new.pre, new.backend, new.post, new.model_id

    def start(self) -> None:
        self.source.open()
        self.stats.started = time.perf_counter()
        self.workers = [SinkWorker(s, max_records=self.sink_queue) for s in self.sinks]
        for name, fn in (
            ("pouta-acquire", self._acquire_loop),
            ("pouta-infer", self._infer_loop),
            ("pouta-write", self._write_loop),
        ):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        aux = []
        if self.heartbeat_s > 0 and self.sinks:
            aux.append(threading.Thread(target=self._heartbeat_loop, name="pouta-heartbeat", daemon=True))
        if self.verdict_timeout_s:
            aux.append(threading.Thread(target=self._watchdog_loop, name="pouta-watchdog", daemon=True))
        for t in aux:
            t.start()
        self._aux_threads = aux

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

    def sink_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for w in self.workers:
            st = w.stats()
            st["write_ms"] = {
                "p50": round(percentile(w.write_ms, 50), 3),
                "p99": round(percentile(w.write_ms, 99), 3),
            }
            st["deliver_ms"] = {
                "p50": round(percentile(w.deliver_ms, 50), 3),
                "p99": round(percentile(w.deliver_ms, 99), 3),
            }
            name, n = w.name, 2
            while name in out:
                name, n = f"{w.name}{n}", n + 1
            out[name] = st
        return out

    def counters(self) -> dict[str, Any]:
        """The pipeline's own counters plus the source's (each counted by its one owner)."""
        return {**self.stats.snapshot(), "reconnects": self.source.reconnects, "source": self.source.stats}

    def status_line(self) -> str:
        return status_line(self.summary())

    def summary(self) -> dict[str, Any]:
        """``counters()`` plus every sink's own counters; the first sink's (the files, when
        configured) are the headline ``written`` and ``unsaved_in_memory``."""
        s = self.counters()
        s["model_id"] = self.model_id
        s["backend"] = self.backend.name
        sinks = self.sink_stats()
        s["sinks"] = sinks
        first = next(iter(sinks.values()), {})
        s["written"] = int(first.get("written", first.get("delivered", 0)))
        s["unsaved_in_memory"] = int(first.get("backlog", 0))
        s["backlog_dropped"] = sum(int(v.get("backlog_dropped", 0)) for v in sinks.values())
        s["write_errors"] = sum(int(v.get("errors", 0)) + int(v["exceptions"]) for v in sinks.values())
        if self.workers:
            s["latency_ms"]["write"] = sinks[next(iter(sinks))]["write_ms"]
        s["seq_next"] = self.sequence.peek
        s["fault"] = self.fault
        s["unnumbered"] = self.unnumbered
        # Records that never reached a sink: full queues, full backlogs, and what was still
        # queued when a sink did not finish within close_timeout_s.
        s["records_lost"] = sum(sum(int(v.get(k, 0)) for k in LOST_KEYS) for v in sinks.values())
        return s

    # -- fault state ---------------------------------------------------------
    @property
    def fault(self) -> str | None:
        """The active faults, comma separated; None while there is none."""
        with self._fault_lock:
            return ", ".join(sorted(self._faults)) or None

    def raise_fault(self, name: str, message: str) -> None:
        with self._fault_lock:
            new = name not in self._faults
            self._faults[name] = message
        if new:
            self.stats.add(faults=1)
            log.error("fault: %s (%s); ready dropped", name, message)
            self._beat_now.set()  # the PLC learns now, not at the next heartbeat

    def clear_fault(self, *names: str) -> None:
        with self._fault_lock:
            cleared = [n for n in names if self._faults.pop(n, None) is not None]
        if cleared:
            log.warning("fault cleared: %s", ", ".join(cleared))
            self._beat_now.set()

    # -- helpers -----------------------------------------------------------
    def _new_part(self, frame: Frame | None, reason: str | None = None) -> PendingPart | None:
        """The part numbered; None (and the fault raised) when no number can be given safely."""
        raw = frame.part_id if frame is not None else None
        if raw is None:
            raw = self._plc_part_id()
        part_id = clean_part_id(raw)
        if raw is not None and part_id is None:
            self.stats.add(part_id_rejected=1)
            log.warning("part id refused (%d characters, printable up to 64 expected)", len(str(raw)))
        try:
            seq = self.sequence.next()
        except SequenceError as exc:
            self.unnumbered += 1
            self.raise_fault("sequence", str(exc))
            try:
                signal_verdict(self.source, self.not_inspected_is_ng)
            except Exception as sig_exc:
                log.warning("signalling the verdict to the source failed: %s", sig_exc)
            return None
        self.clear_fault("sequence")
        return PendingPart(seq, part_id, frame, reason, gap=self.sequence.take_gap())

    def _queue(self, part: PendingPart | None) -> None:
        if part is not None:
            self.frames.put(part, self.stop_event)

    def _plc_part_id(self) -> str | None:
        # The PLC writes the id of the next part before it triggers; it is latched here,
        # at acquisition, so a later write belongs to the next part.
        for s in self.sinks:
            fn = getattr(s, "part_id", None)
            if fn is None:
                continue
            try:
                pid = fn()
            except Exception as exc:
                log.warning("reading the part id from %s failed: %s", s.name, exc)
                continue
            if pid is not None:
                return str(pid)
        return None

    def _on_drop(self, part: Any) -> None:
        if isinstance(part, PendingPart):
            part.reason = part.reason or "dropped"
            part.frame = _slim(part.frame)
            self._dropped.append(part)

    def _not_inspected(self, part: PendingPart) -> PartResult:
        frame = part.frame if part.frame is not None else _empty_frame(self.source, part.wall_time)
        return PartResult(
            _slim(frame) or frame,
            None,
            self.model_id,
            {},
            wall_time=part.wall_time,
            seq=part.seq,
            part_id=part.part_id,
            reason=part.reason,
            not_inspected_is_ng=self.not_inspected_is_ng,
            gap=part.gap,
        )

    def _emit(self, result: PartResult) -> bool:
        """Hand one record on, in sequence order; False (and nothing sent) for a part that
        already has its record (a verdict that came after the watchdog gave up on it)."""
        with self._emit_lock:
            if self._last_emitted is not None and result.seq <= self._last_emitted:
                self.stats.add(late_verdicts=1)
                log.warning("part %s: verdict came after its NOT_INSPECTED record; discarded", result.seq)
                return False
            self._last_emitted = result.seq
            v = result.verdict
            if v is None:
                self.stats.add(not_inspected=1)
            else:
                counts = {"processed": 1, "ok": int(not v.is_ng), "ng": int(v.is_ng)}
                if result.frame.label is not None:
                    counts["labelled"] = 1
                    counts["correct"] = int(result.frame.label == v.verdict)
                self.stats.add(**counts)
                self.stats.record(result.latency_ms)
            try:
                signal_verdict(self.source, result.reject)
            except Exception as exc:  # the strobe is an extra: it must not cost the record
                log.warning("signalling the verdict to the source failed: %s", exc)
            self.results.put(result)
            return True

    def _emit_dropped_before(self, seq: int | None) -> None:
        with self._emit_lock:
            while self._dropped and (seq is None or self._dropped[0].seq < seq):
                self._emit(self._not_inspected(self._dropped.popleft()))

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
                    # A part was in front of the camera; its frame is unusable: it still gets a record.
                    self.stats.add(corrupt=1, acquired=1)
                    log.warning("corrupt frame: %s", exc)
                    n += 1
                    self.clear_fault(*SOURCE_FAULTS)
                    self._queue(self._new_part(None, "corrupt_frame"))
                    continue
                except FrameTimeout as exc:
                    self.stats.add(timeouts=1)
                    log.debug("%s", exc)
                    # The camera is not delivering (free-running), or a triggered part got no frame.
                    self.raise_fault("no_frame", str(exc))
                    if exc.after_trigger:
                        # Triggered, so a part was there, but no frame came.
                        n += 1
                        self.stats.add(acquired=1)
                        self._queue(self._new_part(None, "timeout_after_trigger"))
                    continue
                except Exception as exc:
                    self.stats.add(frame_errors=1)
                    log.exception("acquisition failed for one frame: %s", exc)
                    self.raise_fault("source_error", f"{type(exc).__name__}: {exc}")
                    # A source that fails on every call must not spin a core.
                    stop.wait(0.05)
                    continue
                if frame is None:
                    break
                n += 1
                self.stats.add(acquired=1)
                self.clear_fault(*SOURCE_FAULTS)
                self._queue(self._new_part(frame))
        except BaseException as exc:  # pragma: no cover - last resort, keeps shutdown orderly
            self.fatal = exc
            log.exception("acquisition thread stopped: %s", exc)
        finally:
            try:
                self.source.close()
            except Exception as exc:
                log.warning("closing the source failed: %s", exc)
            self.frames.put(END, stop)

    def _infer_loop(self) -> None:
        while True:
            self.progress_at = time.monotonic()
            # Taking a part and marking it current is one step under the emit lock: the
            # watchdog must never record younger parts while this one is between the two.
            with self._emit_lock:
                try:
                    part = self.frames.get_nowait()
                except queue.Empty:
                    part = None
                else:
                    self.frames.settle()
                    if part is not END:
                        self._emit_dropped_before(part.seq)
                        self._current = part
            if part is None:
                # Idle: parts dropped earlier have no younger part to wait for.
                self._emit_dropped_before(None)
                self.frames.wait_item(0.05)
                continue
            if part is END:
                break
            self._inflight = 1
            result = self._judge(part)
            with self._emit_lock:
                self._current = None
                if self._emit(result) and result.verdict is not None:
                    self.clear_fault(*VERDICT_FAULTS)
            self._inflight = 0
        self._emit_dropped_before(None)
        self.results.put(END)

    def _watchdog_loop(self) -> None:
        limit = float(self.verdict_timeout_s or 0)
        tick = min(0.05, limit / 4)
        while not self._done.wait(tick):
            self._check_verdicts(limit)

    def _check_verdicts(self, limit: float) -> None:
        """No verdict within ``limit`` of acquisition: fault, and every waiting part gets its
        NOT_INSPECTED record now (the part being judged, dropped parts, the queue)."""
        now = time.monotonic()
        with self._emit_lock:
            cur = self._current
            head = self.frames.oldest()
            late_cur = cur is not None and now - cur.t0 > limit
            late_head = isinstance(head, PendingPart) and now - head.t0 > limit
            if not (late_cur or late_head):
                return
            self.raise_fault("verdict_timeout", f"no verdict within {limit:g} s of acquisition")
            waiting: list[PendingPart] = []
            if cur is not None and (self._last_emitted is None or cur.seq > self._last_emitted):
                waiting.append(cur)
            waiting += list(self._dropped)
            self._dropped.clear()
            waiting += [p for p in self.frames.drain() if isinstance(p, PendingPart)]
            for part in sorted(waiting, key=lambda p: p.seq):
                if part.reason is None:
                    part.reason = "verdict_timeout"
                    self.stats.add(verdict_timeouts=1)
                part.frame = _slim(part.frame)
                self._emit(self._not_inspected(part))

    def _judge(self, part: PendingPart) -> PartResult:
        if self._swap is not None:
            self._apply_swap()
        frame = part.frame
        if frame is None:
            return self._not_inspected(part)
        pre, backend, post = self.pre, self.backend, self.post
        try:
            t0 = time.perf_counter()
            # All tiles of a frame (one input when the model is not tiled) in one backend call.
            x, geometry = pre.tiles(frame.image, frame.color_order)
            t1 = time.perf_counter()
            amap, score = backend.run(x)
            t2 = time.perf_counter()
            verdict = post(amap, score, geometry)
            t3 = time.perf_counter()
        except NonFiniteOutput as exc:
            self.stats.add(non_finite=1)
            log.error("part %s (frame %s): %s; NOT_INSPECTED", part.seq, frame.frame_id, exc)
            part.reason = "non_finite_score"
            self.raise_fault("non_finite_score", str(exc))
            return self._not_inspected(part)
        except Exception as exc:
            self.stats.add(frame_errors=1)
            log.exception("part %s (frame %s) could not be inspected: %s", part.seq, frame.frame_id, exc)
            part.reason = "inference_error"
            self.raise_fault("inference_error", f"{type(exc).__name__}: {exc}")
            return self._not_inspected(part)
        lat = {
            "queue": (t0 - frame.acquired) * 1e3,
            "preprocess": (t1 - t0) * 1e3,
            "infer": (t2 - t1) * 1e3,
            "postprocess": (t3 - t2) * 1e3,
            "total": (t3 - frame.acquired) * 1e3,
        }
        return PartResult(
            frame,
            verdict,
            self.model_id,
            lat,
            wall_time=part.wall_time,
            seq=part.seq,
            part_id=part.part_id,
            not_inspected_is_ng=self.not_inspected_is_ng,
            gap=part.gap,
        )

    def _write_loop(self) -> None:
        last_model = self.model_id
        try:
            while True:
                result = self.results.get()
                if result is END:
                    break
                if result.model_id != last_model:  # a promotion: the first record says so
                    result.previous_model_id, last_model = last_model, result.model_id
                result.to_dict()  # once, before several sink threads read it
                if self._keep:
                    self.recent.append(result)
                # Sinks with ``peek`` (the live view) take frame references here, while the
                # frame is still attached; ``peek`` returns at once and never raises.
                for s in self.sinks:
                    if hasattr(s, "peek"):
                        s.peek(result)
                for w in self.workers:
                    w.put(result)
        finally:
            for w in self.workers:
                if not w.close(self.close_timeout_s):
                    log.error(
                        "sink %s did not finish within %.0f s; %d records not delivered there",
                        w.name,
                        self.close_timeout_s,
                        w.queued,
                    )
            self._done.set()
            self._beat_now.set()

    def _heartbeat_loop(self) -> None:
        beat = 0
        while True:
            # A raised or cleared fault wakes the heartbeat at once.
            if beat:
                self._beat_now.wait(self.heartbeat_s)
            self._beat_now.clear()
            if self._done.is_set():
                break
            beat += 1
            s = self.stats.snapshot()
            fault = self.fault
            state = {
                "ready": not self.stop_event.is_set() and fault is None,
                "fault": fault is not None,
                "fault_reason": fault,
                "busy": bool(self._inflight or not self.frames.empty()),
                "time": utc_iso(time.time()),
                "parts": s["parts"],
                "ok": s["ok"],
                "ng": s["ng"],
                "not_inspected": s["not_inspected"],
                "model_id": self.model_id,
            }
            for sink in self.sinks:
                fn = getattr(sink, "heartbeat", None)
                if fn is None:
                    continue
                try:
                    fn(beat, state)
                except Exception as exc:
                    log.debug("heartbeat to %s failed: %s", sink.name, exc)


_NO_PIXELS = np.empty((0, 0), np.uint8)


def _slim(frame: Frame | None) -> Frame | None:
    """The frame's identity without its pixels (records of dropped parts keep no images)."""
    if frame is None or frame.image.size == 0:
        return frame
    slim = Frame(
        _NO_PIXELS,
        frame.frame_id,
        frame.timestamp_ns,
        frame.source,
        frame.label,
        frame.path,
        frame.color_order,
    )
    slim.acquired = frame.acquired
    return slim


def _empty_frame(source: FrameSource, wall_time: float) -> Frame:
    return Frame(_NO_PIXELS, -1, int(wall_time * 1e9), source.name)


__all__ = ["NOT_INSPECTED", "Pipeline"]
