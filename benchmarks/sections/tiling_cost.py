"""What tiling costs at run time: ms per frame of a tiled model vs the whole-image model.

``python -m pouta.benchmarks.sections.tiling_cost [--source-size 460 1130] [--frames 40] [--rounds 3]``

``whole`` and ``tiled`` are the same randomly initialised ``tiny`` POUTA (speed does not
depend on the weights), exported once as a whole-image 128x128 input and once with the
tiling that ``--tile-scale auto`` chooses for the source size
(``trainer.geometry.choose_geometry``): what tiling itself costs. ``tiled_auto`` is the tiled
model ``pouta-train`` makes by default, whose ``auto`` discriminator widths are wider on
tiles (``trainer.geometry.width_setting``). Each is run through
``runtime_overhead.measure_overhead`` (the edge pipeline with the files sink) in
alternating rounds; the report gives tiles per frame, backend and pre+post ms per frame,
and the cost per tile. Needs the [train] extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import models


def export_pair(work: Path, source_hw: tuple[int, int], size: int = 128) -> dict[str, Path]:
    from pouta.trainer.geometry import AUTO_WIDTHS, DataStats, choose_geometry, width_setting

    model, cfg = models.random_model("tiny", size, size)
    stats = DataStats(1, 1, source_hw, source_hw, source_hw, (3,), ("uint8",))
    geo = choose_geometry(stats, (size, size), "auto")
    if geo.tiling is None:
        raise SystemExit(f"--source-size {source_hw}: auto keeps this size whole; nothing to compare")
    widths = {k: width_setting(k, "auto", getattr(cfg, k), tiled=True) for k in AUTO_WIDTHS}
    wide_model, wide_cfg = models.random_model("tiny", size, size, **widths)
    paths = {
        "whole": work / "whole.onnx",
        "tiled": work / "tiled.onnx",
        "tiled_auto": work / "tiled_auto.onnx",
    }
    models.export(model, cfg, paths["whole"], size, size)
    models.export(model, cfg, paths["tiled"], size, size, tiling=geo.tiling)
    models.export(wide_model, wide_cfg, paths["tiled_auto"], size, size, tiling=geo.tiling)
    return paths


def compare(paths: dict[str, Path], source_hw: tuple[int, int], frames: int, rounds: int) -> dict[str, Any]:
    from pouta.edge.contract.metadata import load_for_model
    from pouta.edge.contract.preprocess import preprocessor_for

    from .runtime_overhead import measure_overhead

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for name in order:
            res = measure_overhead(paths[name], frames=frames, source_size=source_hw, fsync=False, threads=1)
            runs[name].append(res)
            print(
                f"round {r + 1} {name}: backend {res['pure_backend_ms']['p50']:.1f} ms, "
                f"pre+post {res['overhead_ms']['p50']:.1f} ms, {res['throughput_fps']:.1f} fps",
                flush=True,
            )
    out: dict[str, Any] = {"source": list(source_hw), "frames": frames, "rounds": rounds}
    for name, rs in runs.items():
        pre = preprocessor_for(load_for_model(paths[name]))
        tiles = pre.geometry(source_hw).n_tiles
        backend = statistics.median(x["pure_backend_ms"]["p50"] for x in rs)
        prepost = statistics.median(x["overhead_ms"]["p50"] for x in rs)
        fps = statistics.median(x["throughput_fps"] for x in rs)
        out[name] = {
            "tiles_per_frame": tiles,
            "tile_scale": pre.tiling.scale if pre.tiling else None,
            "backend_ms_per_frame": round(backend, 2),
            "pre_post_ms_per_frame": round(prepost, 2),
            "ms_per_frame": round(backend + prepost, 2),
            "pipeline_fps": round(fps, 2),
        }
    w, t = out["whole"], out["tiled"]
    extra_tiles = max(1, t["tiles_per_frame"] - w["tiles_per_frame"])
    out["added_ms_per_frame"] = round(t["ms_per_frame"] - w["ms_per_frame"], 2)
    out["added_ms_per_tile"] = round(out["added_ms_per_frame"] / extra_tiles, 2)
    out["tiled_auto_over_tiled"] = round(out["tiled_auto"]["ms_per_frame"] / t["ms_per_frame"], 3)
    out["pre_post_ms_per_tile"] = round(
        (t["pre_post_ms_per_frame"] - w["pre_post_ms_per_frame"]) / extra_tiles, 3
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pouta.benchmarks.sections.tiling_cost", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--source-size", type=int, nargs=2, default=(460, 1130), metavar=("H", "W"))
    ap.add_argument("--frames", type=int, default=40, help="frames per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per model")
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    a = ap.parse_args(argv)
    source_hw = (int(a.source_size[0]), int(a.source_size[1]))
    with tempfile.TemporaryDirectory(prefix="pouta-tiling-cost-") as tmp:
        res = compare(export_pair(Path(tmp), source_hw), source_hw, a.frames, a.rounds)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n", encoding="utf-8")
    w, t = res["whole"], res["tiled"]
    print(
        f"whole 1 input: {w['ms_per_frame']:.1f} ms/frame; tiled {t['tiles_per_frame']} tiles at scale "
        f"{t['tile_scale']:.3g}: {t['ms_per_frame']:.1f} ms/frame; added {res['added_ms_per_tile']:.2f} ms per "
        f"extra tile (of which cutting+stitching {res['pre_post_ms_per_tile']:.3f} ms); the default "
        f"tiled model (auto widths): {res['tiled_auto']['ms_per_frame']:.1f} ms/frame"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
