"""Runtime overhead benchmark: what the pipeline costs on top of the model itself.

overhead per frame = (preprocess + backend + postprocess, measured inside the pipeline)
minus the pure backend time of the same frame; plus a throughput view (wall time per
frame of the whole threaded pipeline minus the median pure backend call), and a drop test
where the source runs faster than inference with ``drop-oldest``: every part acquired
must have its result file, a dropped one with verdict NOT_INSPECTED (parts without a
record = 0).

    python -m pouta.benchmarks.sections.runtime_overhead MODEL.onnx --frames 300
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pouta.edge.backends.protocol import open_backend
from pouta.edge.contract.preprocess import preprocessor_for
from pouta.edge.pipeline import Pipeline
from pouta.edge.postprocess import PostProcessor
from pouta.edge.sinks.files import ResultWriter
from pouta.edge.sources.replay import ArraySource
from pouta.edge.stats import percentile


def _parts(h: int, w: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(20, 60, size=(h, w, 3), dtype=np.uint8)
        if i % 2:
            img[h // 3 : h // 2, w // 3 : w // 2] = 240
        out.append(img)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3)}


def measure_overhead(
    model_path: str | os.PathLike[str],
    frames: int = 300,
    source_size: tuple[int, int] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    fsync: bool = True,
    drop_rate_factor: float = 3.0,
    threads: int | None = None,
    spin: bool = True,
) -> dict[str, Any]:
    """Measure runtime overhead and drop behaviour; returns a JSON-able dict (times in ms)."""
    backend = open_backend(model_path, threads=threads, spin=spin)
    meta = backend.metadata
    h, w = meta.input.height, meta.input.width
    sh, sw = source_size or (h, w)
    pre = preprocessor_for(meta)
    thresholds = meta.thresholds
    post = PostProcessor(
        thresholds,
        image_threshold=None if thresholds else 0.5,
        pixel_threshold=None if thresholds else 0.5,
    )
    images = _parts(sh, sw, 16)

    x = pre.tiles(images[0])[0]
    for _ in range(10):
        backend.run(x)
    pure = []
    for i in range(frames):
        xi = pre.tiles(images[i % len(images)])[0]
        t0 = time.perf_counter()
        backend.run(xi)
        pure.append((time.perf_counter() - t0) * 1e3)
    pure_p50 = percentile(pure, 50)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(out_dir) if out_dir else Path(tmp)
        # 1) Latency/throughput: block policy, source as fast as the pipeline takes frames.
        sink = ResultWriter(base / "latency", overlays="ng", fsync=fsync)
        pipe = Pipeline(
            ArraySource(images, count=frames), pre, backend, post, sink, policy="block", keep_results=frames
        )
        t0 = time.perf_counter()
        s1 = pipe.run()
        wall = time.perf_counter() - t0
        lat = [r.latency_ms for r in pipe.recent]
        in_pipe = [d["preprocess"] + d["infer"] + d["postprocess"] for d in lat]
        overhead = [d["preprocess"] + d["postprocess"] for d in lat]
        total = [d["total"] for d in lat]

        # 2) Drops: camera at drop_rate_factor x the inference rate, drop-oldest.
        rate = drop_rate_factor * 1e3 / max(percentile(in_pipe, 50), 1e-3)
        sink2 = ResultWriter(base / "drops", overlays="ng", fsync=fsync)
        pipe2 = Pipeline(
            ArraySource(images, count=frames, fps=rate),
            pre,
            backend,
            post,
            sink2,
            queue_size=2,
            policy="drop-oldest",
        )
        s2 = pipe2.run()
        # parts/<date>/...json: one record per part seen, whatever its verdict.
        records = [json.loads(p.read_text()) for p in (base / "drops" / "parts").rglob("*.json")]
        verdicts = [r["verdict"] for r in records]
    backend.close()
    return {
        "model": str(model_path),
        "backend": backend.name,
        "input": [h, w],
        "source": [sh, sw],
        "frames": frames,
        "fsync": fsync,
        "spin": spin,
        "pure_backend_ms": _stats(pure),
        "pipeline_backend_ms": _stats([d["infer"] for d in lat]),
        "overhead_ms": _stats(overhead),
        "overhead_vs_pure_ms": _stats([v - pure_p50 for v in in_pipe]),
        "latency_total_ms": _stats(total),
        "write_ms": s1["latency_ms"].get("write", {}),
        "throughput_fps": round(frames / wall, 2),
        "throughput_overhead_ms": round(wall * 1e3 / frames - pure_p50, 3),
        "drop_test": {
            "camera_fps": round(rate, 1),
            "acquired": s2["acquired"],
            "processed": s2["processed"],
            "dropped": s2["dropped"],
            "not_inspected": s2["not_inspected"],
            "result_files": len(records),
            "result_files_not_inspected": verdicts.count("NOT_INSPECTED"),
            "distinct_seq": len({r["seq"] for r in records}),
            "lost_result_files": s2["acquired"] - len({r["seq"] for r in records}),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pouta.benchmarks.sections.runtime_overhead", description=__doc__.splitlines()[0]
    )
    ap.add_argument("model")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--source-size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-spin", action="store_true", help="ONNX Runtime workers sleep between runs")
    ap.add_argument("--out", help="keep the result files here")
    a = ap.parse_args(argv)
    res = measure_overhead(
        a.model,
        a.frames,
        tuple(a.source_size) if a.source_size else None,
        a.out,
        fsync=not a.no_fsync,
        threads=a.threads,
        spin=not a.no_spin,
    )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
