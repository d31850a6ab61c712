"""Section 4: the edge runtime end to end on a replayed folder (fps and per-stage latency).

The folder is replayed through the runtime's own ``Pipeline`` (threaded acquire ->
infer -> write, ``block`` policy so no frame is dropped and fps is what the runtime
sustains). The pipeline times preprocess, backend, postprocess and write itself; the
source's read (file decode) is timed here by wrapping the source. Then
``pouta.benchmarks.sections.runtime_overhead.measure_overhead`` adds its view: overhead over the pure
backend call, and the drop test (camera faster than inference).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..common import Result, error_line, log

STAGES = ("source", "preprocess", "backend", "postprocess", "write")
# Pipeline stat name -> stage name in the report.
_PIPELINE_KEYS = {
    "preprocess": "preprocess",
    "infer": "backend",
    "postprocess": "postprocess",
    "write": "write",
}


class TimedSource:
    """Wraps a frame source and records how long each ``read`` (decode) takes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.read_ms: list[float] = []

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)

    def __setattr__(self, key: str, value: Any) -> None:
        # The pipeline hands its stop event to the source: it must reach the real one.
        if key == "stop_event":
            setattr(self.inner, key, value)
        else:
            super().__setattr__(key, value)

    def open(self) -> None:
        self.inner.open()

    def read(self) -> Any:
        t0 = time.perf_counter()
        frame = self.inner.read()
        self.read_ms.append((time.perf_counter() - t0) * 1e3)
        return frame

    def close(self) -> None:
        self.inner.close()


def _p(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def replay(model: Path, frames: Path, threads: int, max_frames: int, out_dir: Path) -> Result:
    """One model over ``frames`` (looped up to ``max_frames``) through the edge pipeline."""
    from pouta.edge.backends.protocol import open_backend
    from pouta.edge.contract.preprocess import preprocessor_for
    from pouta.edge.pipeline import Pipeline
    from pouta.edge.postprocess import PostProcessor
    from pouta.edge.sinks.files import ResultWriter
    from pouta.edge.sources.replay import ImageFolderSource

    backend = open_backend(model, threads=threads)
    try:
        meta = backend.metadata
        h, w = meta.input.height, meta.input.width
        pre = preprocessor_for(meta)
        thr = meta.thresholds
        # Uncalibrated benchmark models have no thresholds; the verdict is not what is timed.
        post = PostProcessor(thr, image_threshold=None if thr else 0.5, pixel_threshold=None if thr else 0.5)
        source = TimedSource(ImageFolderSource(frames, loop=True))
        n_files = len(source.inner.files)
        # Warm-up outside the timed run: first calls allocate and pick kernels.
        warm = pre.tiles(source.inner.read().image)[0]
        for _ in range(3):
            backend.run(warm)
        source.inner.open()
        source.read_ms.clear()
        sink = ResultWriter(out_dir, overlays="ng")
        pipe = Pipeline(source, pre, backend, post, sink, policy="block", max_frames=max_frames)
        t0 = time.perf_counter()
        summary = pipe.run()
        wall = time.perf_counter() - t0
    finally:
        backend.close()
    lat = summary.get("latency_ms", {})
    stages: dict[str, dict[str, float | None]] = {
        "source": {"p50": _p(source.read_ms, 50), "p99": _p(source.read_ms, 99)}
    }
    for key, stage in _PIPELINE_KEYS.items():
        if key in lat:
            stages[stage] = {"p50": lat[key].get("p50"), "p99": lat[key].get("p99")}
    processed = int(summary.get("processed", 0))
    return {
        "model": model.name,
        "backend": summary.get("backend"),
        "input": [h, w],
        "files": n_files,
        "frames": processed,
        "wall_s": round(wall, 3),
        "fps": processed / wall if wall > 0 and processed else None,
        "stages_ms": stages,
        "stages_median_ms": {k: v["p50"] for k, v in stages.items() if v.get("p50") is not None},
        "total_ms": lat.get("total"),
        "queue_ms": lat.get("queue"),
        "written": summary.get("written"),
        # Every part gets a record; with the block policy none should be NOT_INSPECTED.
        "not_inspected": summary.get("not_inspected"),
        "errors": {k: summary.get(k) for k in ("frame_errors", "write_errors", "corrupt") if summary.get(k)},
    }


def overhead(model: Path, threads: int, frames: int) -> Result:
    from pouta.benchmarks.sections.runtime_overhead import measure_overhead

    raw = measure_overhead(model, frames=frames, threads=threads)
    keep = (
        "pure_backend_ms",
        "pipeline_backend_ms",
        "overhead_ms",
        "overhead_vs_pure_ms",
        "latency_total_ms",
        "throughput_fps",
        "throughput_overhead_ms",
        "drop_test",
    )
    return {k: raw.get(k) for k in keep if k in raw}


def run_endtoend(
    models_to_run: dict[str, Path], frames: Path | None, threads: int, max_frames: int, work_dir: Path
) -> Result:
    if frames is None or not frames.is_dir():
        return {"status": "skipped", "error": f"no folder of frames to replay ({frames})"}
    import pouta.edge.pipeline  # noqa: F401  (unavailable rather than error when missing)

    rows: dict[str, Result] = {}
    for name, path in models_to_run.items():
        log(f"end-to-end: {name} ({path.name}) replaying {frames}, {max_frames} frames")
        try:
            rows[name] = replay(path, frames, threads, max_frames, work_dir / name)
        except Exception as exc:
            rows[name] = {"model": path.name, "error": error_line(exc)}
            continue
        if not name.startswith("pouta"):
            # The runtime's overhead does not depend on the model; POUTA's rows show it.
            continue
        try:
            # Fewer frames: measure_overhead runs the model about three times per frame.
            rows[name]["runtime_overhead"] = overhead(path, threads, max(10, max_frames // 4))
        except Exception as exc:
            rows[name]["runtime_overhead"] = {"error": error_line(exc)}
    ok = any("error" not in r for r in rows.values())
    out: Result = {"status": "ok" if ok else "error", "frames": str(frames), "threads": threads, "rows": rows}
    if not ok:
        out["error"] = next((r["error"] for r in rows.values() if "error" in r), "nothing measured")
    return out
