"""Shared pieces of the benchmark: section isolation, progress output, statistics, machine info.

Every section returns a plain JSON-able dict with a ``status`` ("ok", "error",
"unavailable" or "skipped") so that one broken backend, or a part a slim install lacks
(torch, TensorRT), shows up in the report as a line, instead of losing the whole run.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from pouta.edge.contract.metadata import ARTIFACT_TOOLS, tool_versions

# Paper Table 5 (224x224, batch 1). FLOPs there are almost certainly MACs (thop style).
PAPER = {
    "pouta": {"params": 15.02e6, "flops": 35.37e9, "latency_ms": 32.0},
    "vanilla": {"params": 28.68e6, "flops": 39.38e9, "latency_ms": 52.0},
}
PAPER_LATENCY_RATIO = PAPER["pouta"]["latency_ms"] / PAPER["vanilla"]["latency_ms"]

# Acceptance targets of issue 5.
TARGET_PARAMS_TOL = 0.10
TARGET_FLOP_RATIO = 0.90
TARGET_LATENCY_RATIO = 0.70
TARGET_INT8_RATIO = 0.50

KINDS: tuple[str, str] = ("pouta", "vanilla")
VARIANTS: tuple[str, ...] = ("base", "hsg", "mss", "full")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"

Result = dict[str, Any]


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays clean for the final summary)."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[pouta-bench {stamp}] {msg}", file=sys.stderr, flush=True)


def error_line(exc: BaseException) -> str:
    """One line naming the exception and where it was raised, for the report."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = ""
    if tb:
        frame = tb[-1]
        where = f" ({Path(frame.filename).name}:{frame.lineno})"
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}{where}"[:500]


def unavailable(reason: str) -> Result:
    return {"status": "unavailable", "error": reason}


def skipped(reason: str) -> Result:
    return {"status": "skipped", "error": reason}


def run_isolated(name: str, fn: Callable[[], Result]) -> Result:
    """Run one section; an exception becomes ``status: error`` with its line, never a crash.

    A missing integration module is "unavailable" rather than "error": it is expected
    while the other modules are being written, and on slim installs (no torch).
    """
    t0 = time.perf_counter()
    log(f"section {name}: start")
    try:
        res = fn()
    except ModuleNotFoundError as exc:
        res = unavailable(f"module not found: {exc.name}")
    except ImportError as exc:
        res = unavailable(error_line(exc))
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        res = {"status": "error", "error": error_line(exc)}
    res.setdefault("status", "ok")
    res["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"section {name}: {res['status']} in {res['seconds']:.1f} s")
    return res


@contextmanager
def progress(what: str) -> Iterator[None]:
    t0 = time.perf_counter()
    log(f"{what} ...")
    yield
    log(f"{what} done in {time.perf_counter() - t0:.1f} s")


def latency_stats(samples_s: list[float]) -> dict[str, float]:
    """Milliseconds. p99 of n < 100 samples is close to the max: ``n`` is kept beside it."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "median_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "std_ms": float(a.std()),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not np.isfinite(a) or not np.isfinite(b) or b == 0:
        return None
    return float(a) / float(b)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# What a benchmark's numbers depend on: the artifact tools plus the quantizer and plotting.
PACKAGES = (*ARTIFACT_TOOLS, "onnxconverter-common", "matplotlib", "scikit-learn")


def package_versions() -> dict[str, str]:
    return tool_versions(PACKAGES)


def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_avg_1m": None,
        "gpu": None,
    }
    with suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # torch is optional on edge installs
        pass
    return info


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON types; NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
