"""Timing several runners alternately, so a burst of load from another process hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .common import log

Step = Callable[[], None]


@dataclass
class TimingPlan:
    warmup: int = 5
    iters: int = 50
    min_iters: int = 10
    budget_s: float = 60.0  # per backend and batch size, both models together
    # Untimed pause before each timed call. ONNX Runtime's worker threads keep spinning
    # for a while after a run; on 2 cores the next session in the loop then competes
    # with them and is billed for it; a short pause lets them go idle first.
    settle_s: float = 0.05


def interleaved(runners: dict[str, Step], plan: TimingPlan, label: str = "") -> dict[str, list[float]]:
    """Seconds per call for each runner, measured alternately (ABBA order)."""
    names = list(runners)
    # Warm-up is capped at a fifth of the budget: five untimed rounds of a paper-size
    # model at batch 8 on a 2-core CPU would otherwise cost more than the timed part.
    t_warm = time.perf_counter()
    for _ in range(plan.warmup):
        for n in names:
            runners[n]()
        if time.perf_counter() - t_warm > 0.2 * plan.budget_s:
            break
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = last_report = time.perf_counter()
    for i in range(plan.iters):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            if plan.settle_s > 0:
                time.sleep(plan.settle_s)
            t0 = time.perf_counter()
            runners[n]()
            samples[n].append(time.perf_counter() - t0)
        now = time.perf_counter()
        if now - last_report > 15.0:
            log(f"  {label}: {i + 1}/{plan.iters} iterations, {now - start:.0f} s")
            last_report = now
        if i + 1 >= plan.min_iters and now - start > plan.budget_s:
            log(f"  {label}: time budget {plan.budget_s:.0f} s reached after {i + 1} iterations")
            break
    return samples


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    n = min(len(a), len(b))
    if n == 0:
        return None
    return float(np.median(np.asarray(a[:n]) / np.asarray(b[:n])))
