"""Counters and latency windows of a running pipeline, and the console status line."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def percentile(values: collections.deque[float] | list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q))


FPS_WINDOW = 256  # parts: the live fps is measured over the last this many


@dataclass
class Stats:
    """Counters and latency windows, shared by the threads (one lock)."""

    window: int = 4096
    started: float = field(default_factory=time.perf_counter)
    acquired: int = 0
    processed: int = 0
    ok: int = 0
    ng: int = 0
    not_inspected: int = 0
    dropped: int = 0
    corrupt: int = 0
    timeouts: int = 0
    frame_errors: int = 0
    labelled: int = 0
    correct: int = 0
    non_finite: int = 0  # parts whose model output was NaN/inf
    verdict_timeouts: int = 0  # parts the watchdog recorded NOT_INSPECTED
    late_verdicts: int = 0  # verdicts that came after the watchdog had recorded their part
    faults: int = 0  # times the fault state was raised
    part_id_rejected: int = 0  # part ids refused (too long, not printable)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    latency: dict[str, collections.deque[float]] = field(default_factory=dict, repr=False)
    _done_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=FPS_WINDOW)
    )

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def record(self, latency_ms: dict[str, float], part_done: bool = True) -> None:
        """Latencies of one stage set; ``part_done`` marks one finished part for the fps
        (only the inference record does: a part is one part however many sinks it reaches)."""
        with self.lock:
            for k, v in latency_ms.items():
                self.latency.setdefault(k, collections.deque(maxlen=self.window)).append(v)
            if part_done:
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
                    "ok",
                    "ng",
                    "not_inspected",
                    "dropped",
                    "corrupt",
                    "timeouts",
                    "frame_errors",
                    "labelled",
                    "correct",
                    "non_finite",
                    "verdict_timeouts",
                    "late_verdicts",
                    "faults",
                    "part_id_rejected",
                )
            }
        elapsed = time.perf_counter() - self.started
        return {
            **counts,
            "parts": counts["ok"] + counts["ng"] + counts["not_inspected"],
            "elapsed_s": round(elapsed, 3),
            "fps": round(self.fps(), 2),
            "mean_fps": round(counts["processed"] / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms": {k: {"p50": round(a, 3), "p99": round(b, 3)} for k, (a, b) in lat.items()},
            "accuracy": round(counts["correct"] / counts["labelled"], 4) if counts["labelled"] else None,
        }


def status_line(s: dict[str, Any]) -> str:
    """One console line from a pipeline's ``summary()``."""
    tot = s["latency_ms"].get("total", {"p50": 0.0, "p99": 0.0})
    line = (
        f"{s['processed']} parts  {s['fps']:.1f} fps  latency p50 {tot['p50']:.1f} ms "
        f"p99 {tot['p99']:.1f} ms  OK {s['ok']} NG {s['ng']}  not inspected {s['not_inspected']}  "
        f"dropped {s['dropped']}"
    )
    extra = [
        f"{k.replace('_', ' ')} {s[k]}"
        for k in ("corrupt", "timeouts", "reconnects", "frame_errors", "write_errors")
        if s[k]
    ]
    return line + ("  " + "  ".join(extra) if extra else "")
