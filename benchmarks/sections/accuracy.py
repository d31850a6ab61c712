"""Section 3: accuracy beside cost.

POUTA and vanilla are trained with the same wall-clock budget (or taken from
``--checkpoints``), then scored on the category's test split in FP32 (PyTorch and ONNX
Runtime) and INT8 (ONNX Runtime u8s8), and each row carries its cost: params, MACs and
a short ONNX Runtime CPU latency of the very artifact that was scored.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pouta.edge.contract.settings import parse_hw

from .. import artifacts, models
from ..common import KINDS, Result, error_line, latency_stats, log, progress, ratio, skipped
from ..timing import TimingPlan, interleaved

# model.pt is the trainer's final checkpoint; last.pt is its resumable one (same weights at the end).
CHECKPOINT_NAMES = ("model.pt", "last.pt", "last.ckpt", "best.pt", "best.ckpt", "checkpoint.pt")


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a training run left in ``folder`` (newest ``*.pt``/``*.ckpt`` as fallback)."""
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(
        (p for p in folder.glob("**/*") if p.suffix in (".pt", ".ckpt") and p.is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def checkpoint_for(kind: str, checkpoints: Path) -> Path | None:
    """``DIR/<kind>/`` or ``DIR/train-<kind>/`` (a training run, e.g. an earlier bench's
    ``accuracy/`` folder) or ``DIR/<kind>*.pt``/``.ckpt`` (a file)."""
    for sub in (checkpoints / kind, checkpoints / f"train-{kind}"):
        if sub.is_dir():
            found = find_checkpoint(sub)
            if found is not None:
                return found
    for pattern in (f"{kind}.pt", f"{kind}.ckpt", f"{kind}*.pt", f"{kind}*.ckpt"):
        hits = sorted(checkpoints.glob(pattern))
        if hits:
            return hits[0]
    return None


def train_command(
    data: Path,
    kind: str,
    preset: str,
    minutes: float,
    steps: int,
    out: Path,
    seed: int,
    size: str | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pouta.trainer.train",
        "--data",
        str(data),
        "--preset",
        preset,
        "--kind",
        kind,
    ]
    if kind == "pouta":
        cmd += ["--variant", "full"]
    cmd += ["--steps", str(steps), "--time-limit-min", f"{minutes:g}", "--out", str(out), "--seed", str(seed)]
    if size:
        cmd += ["--size", size]
    # A tqdm bar in a log file is one line per refresh; the log keeps the JSON rows anyway.
    return [*cmd, "--no-progress"]


def train(
    data: Path,
    kind: str,
    preset: str,
    minutes: float,
    steps: int,
    out: Path,
    seed: int,
    size: str | None = None,
) -> tuple[Path, Result]:
    """Train one model in a subprocess (its own process: no state leaks between the two runs)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = train_command(data, kind, preset, minutes, steps, out, seed, size)
    log(f"accuracy: training {kind} ({minutes:g} min budget, <= {steps} steps): {shlex.join(cmd)}")
    seconds = run_training(cmd, out, f"accuracy: training {kind}")
    ck = find_checkpoint(out)
    if ck is None:
        raise FileNotFoundError(f"training {kind} finished but left no checkpoint in {out}")
    log(f"accuracy: {kind} trained in {seconds:.0f} s -> {ck}")
    return ck, {"command": shlex.join(cmd), "train_seconds": round(seconds, 1), "log": str(out / "train.log")}


def run_training(cmd: list[str], out: Path, what: str) -> float:
    """Run a training command with its output in ``out/train.log``; progress every 30 s; seconds taken."""
    t0 = time.perf_counter()
    logf = out / "train.log"
    with logf.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while True:
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(f"{what}: {time.perf_counter() - t0:.0f} s, {_last_step(out)}")
    if proc.returncode != 0:
        tail = logf.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail[0]} [log: {logf}]")
    return time.perf_counter() - t0


def _last_step(out: Path) -> str:
    """The trainer's latest JSON log row, for progress lines (it logs every few steps)."""
    import json

    for name in ("train_log.jsonl", "log.jsonl", "train.jsonl"):
        p = out / name
        if p.is_file():
            lines = p.read_text(errors="replace").strip().splitlines()
            if lines:
                try:
                    row = json.loads(lines[-1])
                    loss = row.get("total", row.get("loss"))
                    shown = f"{loss:.4f}" if isinstance(loss, float) else "?"
                    return f"step {row.get('step')}, loss {shown}"
                except json.JSONDecodeError:
                    break
    return "no step logged yet"


def _metrics(res: Any) -> dict[str, float | None]:
    d = res if isinstance(res, dict) else vars(res)
    out: dict[str, float | None] = {}
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "image_ap"):
        v = d.get(key)
        out[key] = float(v) if isinstance(v, int | float) else None
    return out


def untrained_checkpoint(kind: str, preset: str, size: str | None, out: Path) -> Path:
    """``--train-steps 0``: a freshly initialised checkpoint, so the scoring path runs without training."""
    from pouta.trainer.checkpoint import save_checkpoint

    h, w = parse_hw(size) if size else (None, None)
    cfg = models.make_config(preset, kind, "full", h, w)
    return save_checkpoint(out / "untrained.pt", models.build(cfg), cfg, step=0, info={"status": "untrained"})


def _evaluate(scorer: Any, data: Path, height: int, width: int, out_dir: Path) -> dict[str, float | None]:
    from pouta.edge.contract.preprocess import Preprocessor
    from pouta.trainer.data.readers import open_dataset
    from pouta.trainer.evaluate import evaluate

    dataset = open_dataset(data, "test")
    pre = Preprocessor(height, width)
    return _metrics(evaluate(scorer, dataset, pre, out_dir=None, batch_size=8, progress=False))


def run_accuracy(
    data: Path | None,
    work_dir: Path,
    preset: str,
    minutes: float,
    steps: int,
    checkpoints: Path | None,
    calib_dir: Path | None,
    threads: int,
    plan: TimingPlan,
    seed: int = 0,
    size: str | None = None,
) -> Result:
    if data is None or not (data / "test").is_dir():
        return skipped(f"data not found ({data}): pass --data PATH to an MVTec-layout category")
    # Fail fast (as "unavailable") before spending the training budget on a missing piece.
    for mod in (
        "pouta.trainer.train",
        "pouta.trainer.evaluate",
        "pouta.trainer.data.readers",
        "pouta.trainer.export",
    ):
        importlib.import_module(mod)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Result] = {}
    training: dict[str, Result] = {}
    onnx_paths: dict[str, Path] = {}
    for kind in KINDS:
        try:
            ck = checkpoint_for(kind, checkpoints) if checkpoints else None
            if ck is not None:
                training[kind] = {"checkpoint": str(ck), "reused": True}
            else:
                if checkpoints:
                    log(f"accuracy: no {kind} checkpoint in {checkpoints}, training one")
                run_dir = work_dir / f"train-{kind}"
                if steps > 0:
                    ck, info = train(data, kind, preset, minutes, steps, run_dir, seed, size)
                    training[kind] = {"checkpoint": str(ck), "reused": False, **info}
                else:
                    ck = untrained_checkpoint(kind, preset, size, run_dir)
                    training[kind] = {"checkpoint": str(ck), "reused": False, "untrained": True}
            model, cfg, info = models.load_checkpoint(ck)
            training[kind]["steps"] = info.get("step")
            h, w = int(cfg.height), int(cfg.width)
            cost = models.model_cost(cfg, h, w)
            base = {
                "kind": kind,
                "preset": getattr(cfg, "preset", preset),
                "height": h,
                "width": w,
                "params": cost["params"],
                "macs": cost["macs"],
                "flops": cost["flops"],
            }
            from pouta.trainer.evaluate import onnx_scorer, torch_scorer

            with progress(f"accuracy: evaluating {kind} fp32 (PyTorch)"):
                rows[f"{kind}-fp32-torch"] = {
                    **base,
                    "precision": "fp32",
                    "runtime": "PyTorch",
                    **_evaluate(torch_scorer(model), data, h, w, work_dir),
                }
            fp32 = models.export(model, cfg, work_dir / f"{kind}.onnx", h, w)
            onnx_paths[f"{kind}-fp32"] = fp32
            with progress(f"accuracy: evaluating {kind} fp32 (ONNX Runtime)"):
                rows[f"{kind}-fp32-ort"] = {
                    **base,
                    "precision": "fp32",
                    "runtime": "ONNX Runtime",
                    "artifact": fp32.name,
                    **_evaluate(onnx_scorer(fp32), data, h, w, work_dir),
                }
            calib = calib_dir if calib_dir is not None else data / "train" / "good"
            try:
                int8 = artifacts.int8_onnx(fp32, calib, target="int8")
                onnx_paths[f"{kind}-int8"] = int8
                with progress(f"accuracy: evaluating {kind} int8 (ONNX Runtime)"):
                    rows[f"{kind}-int8-ort"] = {
                        **base,
                        "precision": "int8",
                        "runtime": "ONNX Runtime",
                        "artifact": int8.name,
                        **_evaluate(onnx_scorer(int8), data, h, w, work_dir),
                    }
            except Exception as exc:
                rows[f"{kind}-int8-ort"] = {**base, "precision": "int8", "error": error_line(exc)}
        except Exception as exc:
            rows.setdefault(
                f"{kind}-fp32-torch", {"kind": kind, "precision": "fp32", "error": error_line(exc)}
            )
            log(f"accuracy: {kind} failed: {error_line(exc)}")
    latency = _artifact_latency(onnx_paths, threads, plan)
    for key, st in latency.items():
        row = rows.get(f"{key}-ort")
        if row is not None:
            row["ort_cpu_b1_median_ms"] = st.get("median_ms")
    deltas = {}
    for kind in KINDS:
        f, q = rows.get(f"{kind}-fp32-ort", {}), rows.get(f"{kind}-int8-ort", {})
        deltas[kind] = {
            m: (q[m] - f[m]) if isinstance(q.get(m), float) and isinstance(f.get(m), float) else None
            for m in ("image_auroc", "pixel_auroc", "pixel_ap")
        }
    ok = any("error" not in r for r in rows.values())
    out: Result = {
        "status": "ok" if ok else "error",
        "data": str(data),
        "preset": preset,
        "train_minutes": minutes,
        "train_steps_max": steps,
        "training": training,
        "rows": rows,
        "int8_minus_fp32": deltas,
        "latency_b1": latency,
        "int8_fp32_latency_ratio": {
            k: ratio(
                latency.get(f"{k}-int8", {}).get("median_ms"), latency.get(f"{k}-fp32", {}).get("median_ms")
            )
            for k in KINDS
        },
    }
    if not ok:
        out["error"] = next(iter(r["error"] for r in rows.values() if "error" in r), "no row")
    return out


def _artifact_latency(paths: dict[str, Path], threads: int, plan: TimingPlan) -> dict[str, Result]:
    """Batch-1 ORT CPU latency of the scored artifacts, all four interleaved in one loop."""
    if not paths:
        return {}
    try:
        import numpy as np
        from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend

        runners = {}
        x: np.ndarray | None = None
        for key, p in paths.items():
            be = OnnxRuntimeBackend(p, threads=threads)
            h, w = be.input_hw
            x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
            runners[key] = (lambda b, xx: lambda: b.run(xx) and None)(be, x)
        samples = interleaved(runners, plan, "accuracy artifacts ORT CPU batch 1")
        return {k: latency_stats(v) for k, v in samples.items()}
    except Exception as exc:
        log(f"accuracy: artifact latency failed: {error_line(exc)}")
        return {"error": {"error": error_line(exc)}}
