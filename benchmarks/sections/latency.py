"""Section 2: POUTA vs vanilla latency on every backend this machine has.

Both models are timed in one loop, alternating which goes first each iteration, so a
burst of load from another process hits both alike; the per-iteration ratio
(``paired_ratio``) is therefore the number to trust on a shared machine, more than
either absolute latency.

Longer than ~350 lines on purpose: the table of backends (framework x device x
precision) and their factories read best together; timing is in ``timing``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifacts, models
from ..common import (
    KINDS,
    PAPER_LATENCY_RATIO,
    TARGET_INT8_RATIO,
    TARGET_LATENCY_RATIO,
    Result,
    error_line,
    latency_stats,
    log,
    ratio,
)
from ..timing import Step, TimingPlan, interleaved, paired_ratio

# Calibration images for the latency section's INT8 files: their speed does not depend on
# how well they are calibrated, and 128 paper-size images take minutes on a 2-core CPU.
LATENCY_N_CALIB = 16


@dataclass
class LatencyBackend:
    """One way to run a model: framework x device x precision."""

    name: str
    framework: str
    device: str
    precision: str
    available: Callable[[], str | None]  # None when usable, else the reason it is not
    factory: Callable[[str, int], Step]  # (kind, batch) -> one timed call
    notes: str = ""
    group: str = ""  # backends of one group are timed in one interleaved loop


@dataclass
class LatencyContext:
    """Models and artifacts shared by the backends, built once and on demand."""

    preset: str
    height: int
    width: int
    threads: int
    work_dir: Path
    calib_dir: Path | None
    _torch_models: dict[str, Any] = field(default_factory=dict)
    _onnx: dict[tuple[str, str], Path] = field(default_factory=dict)

    def input(self, batch: int) -> np.ndarray:
        rng = np.random.default_rng(batch)
        return rng.random((batch, 3, self.height, self.width), dtype=np.float32)

    def torch_model(self, kind: str) -> tuple[Any, Any]:
        if kind not in self._torch_models:
            cfg = models.make_config(self.preset, kind, "full", self.height, self.width)
            self._torch_models[kind] = (models.build(cfg), cfg)
        return self._torch_models[kind]

    def onnx(self, kind: str, precision: str, batch: int) -> Path:
        """The FP32 (exported once per kind, dynamic batch) or INT8 ONNX artifact of ``kind``."""
        key = (kind, precision)
        if key not in self._onnx:
            if precision == "fp32":
                model, cfg = self.torch_model(kind)
                log(f"  exporting {kind} to ONNX ({self.height}x{self.width})")
                self._onnx[key] = models.export(
                    model, cfg, self.work_dir / f"{kind}.onnx", self.height, self.width
                )
            else:
                self._onnx[key] = artifacts.int8_onnx(
                    self.onnx(kind, "fp32", batch), self.calib_dir, target=precision, n_calib=LATENCY_N_CALIB
                )
        fixed = models.onnx_batch_dim(self._onnx[key])
        if fixed is not None and fixed != batch:
            raise RuntimeError(
                f"{self._onnx[key].name} has a fixed batch of {fixed}, cannot run batch {batch}"
            )
        return self._onnx[key]


# -- backends ------------------------------------------------------------------------


def _torch_available(device: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    return check


def _torch_factory(ctx: LatencyContext, device: str, half: bool) -> Callable[[str, int], Step]:
    def make(kind: str, batch: int) -> Step:
        import torch

        model, _ = ctx.torch_model(kind)
        if device != "cpu" or half:
            model = copy.deepcopy(model).to(device)
            if half:
                model = model.half()
        fwd = models.inference_forward(model)
        x = torch.from_numpy(ctx.input(batch)).to(device)
        if half:
            x = x.half()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step() -> None:
            with torch.inference_mode():
                fwd(x)
            sync()

        return step

    return make


def _ort_available(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if provider not in ort.get_available_providers():
            return f"{provider} not in this onnxruntime build ({', '.join(ort.get_available_providers())})"
        try:
            import pouta.trainer.export  # noqa: F401
        except ImportError as exc:
            return f"cannot export ONNX: {error_line(exc)}"
        return None

    return check


def _ort_factory(ctx: LatencyContext, provider: str, precision: str) -> Callable[[str, int], Step]:
    def make(kind: str, batch: int) -> Step:
        from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend

        path = ctx.onnx(kind, precision, batch)
        # CPU stays listed after CUDA so an op without a CUDA kernel falls back instead of failing.
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        backend = OnnxRuntimeBackend(path, providers=providers, threads=ctx.threads)
        x = ctx.input(batch)
        return lambda: backend.run(x) and None  # type: ignore[func-returns-value]

    return make


def _int8_available(target: str) -> Callable[[], str | None]:
    def check() -> str | None:
        base = _ort_available("CPUExecutionProvider")()
        return base or artifacts.int8_unavailable(target)

    return check


def _trt_available() -> str | None:
    return artifacts.trt_unavailable()


def _trt_factory(ctx: LatencyContext, precision: str) -> Callable[[str, int], Step]:
    def make(kind: str, batch: int) -> Step:
        backend = artifacts.trt_backend(ctx.onnx(kind, "fp32", batch), precision, ctx.calib_dir, batch)
        x = ctx.input(batch)
        return lambda: backend.run(x) and None  # type: ignore[func-returns-value]

    return make


def backends(ctx: LatencyContext) -> list[LatencyBackend]:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    return [
        LatencyBackend(
            "torch-cpu-fp32",
            "PyTorch eager",
            "cpu",
            "fp32",
            _torch_available("cpu"),
            _torch_factory(ctx, "cpu", False),
        ),
        LatencyBackend(
            "torch-cuda-fp32",
            "PyTorch eager",
            "cuda",
            "fp32",
            _torch_available("cuda"),
            _torch_factory(ctx, "cuda", False),
        ),
        LatencyBackend(
            "torch-cuda-fp16",
            "PyTorch eager",
            "cuda",
            "fp16",
            _torch_available("cuda"),
            _torch_factory(ctx, "cuda", True),
        ),
        LatencyBackend(
            "ort-cpu-fp32",
            "ONNX Runtime",
            "cpu",
            "fp32",
            _ort_available(cpu),
            _ort_factory(ctx, cpu, "fp32"),
            group="ort-cpu",
        ),
        LatencyBackend(
            "ort-cpu-int8",
            "ONNX Runtime",
            "cpu",
            "int8 (u8s8, QDQ)",
            _int8_available("int8"),
            _ort_factory(ctx, cpu, "int8"),
            group="ort-cpu",
        ),
        LatencyBackend(
            "ort-cuda-fp32",
            "ONNX Runtime",
            "cuda",
            "fp32",
            _ort_available(cuda),
            _ort_factory(ctx, cuda, "fp32"),
            notes="numpy in/out: host-device copies included",
        ),
        LatencyBackend("trt-fp16", "TensorRT", "cuda", "fp16", _trt_available, _trt_factory(ctx, "fp16")),
        LatencyBackend(
            "trt-int8", "TensorRT", "cuda", "int8 (QDQ s8s8)", _trt_available, _trt_factory(ctx, "int8")
        ),
    ]


def run_latency(
    ctx: LatencyContext, batches: list[int], plan: TimingPlan, only: list[str] | None = None
) -> Result:
    try:
        import torch

        torch.set_num_threads(ctx.threads)
        torch_threads: int | None = torch.get_num_threads()
    except ImportError:
        torch_threads = None
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Result] = {}
    groups: dict[str, list[LatencyBackend]] = {}
    for be in backends(ctx):
        if only and be.name not in only:
            continue
        results[be.name] = {
            "framework": be.framework,
            "device": be.device,
            "precision": be.precision,
            "notes": be.notes,
            "batches": {},
        }
        try:
            reason = be.available()
        except Exception as exc:
            reason = error_line(exc)
        if reason:
            results[be.name].update(status="unavailable", error=reason)
            log(f"latency {be.name}: unavailable ({reason})")
            continue
        groups.setdefault(be.group or be.name, []).append(be)
    paired_int8: dict[str, dict[str, float | None]] = {}
    for members in groups.values():
        errors: dict[str, list[str]] = {be.name: [] for be in members}
        for batch in batches:
            per_backend, samples = _measure(members, batch, plan)
            for be in members:
                res = results[be.name]["batches"][str(batch)] = per_backend[be.name]
                if res.get("error"):
                    errors[be.name].append(f"batch {batch}: {res['error']}")
            for kind in KINDS:
                f, q = samples.get(f"ort-cpu-fp32|{kind}"), samples.get(f"ort-cpu-int8|{kind}")
                if f and q:
                    paired_int8.setdefault(str(batch), {})[kind] = paired_ratio(q, f)
        for be in members:
            errs = errors[be.name]
            status = "ok" if not errs else ("error" if len(errs) == len(batches) else "partial")
            results[be.name]["status"] = status
            if errs:
                results[be.name]["error"] = "; ".join(errs)
    summary = _summarise(
        results, batches, paired_int8, ctx.preset == "paper" and (ctx.height, ctx.width) == (224, 224)
    )
    return {
        "status": "ok" if any(r.get("status") in ("ok", "partial") for r in results.values()) else "error",
        "preset": ctx.preset,
        "height": ctx.height,
        "width": ctx.width,
        "batches": batches,
        "threads": ctx.threads,
        "torch_threads": torch_threads,
        "plan": vars(plan),
        "backends": results,
        "int8_fp32_ratio_paired": paired_int8,
        **summary,
    }


def _measure(
    members: list[LatencyBackend], batch: int, plan: TimingPlan
) -> tuple[dict[str, Result], dict[str, list[float]]]:
    """Time both kinds on every backend of one group in a single interleaved loop."""
    label = f"{'+'.join(be.name for be in members)} batch {batch}"
    log(f"latency {label}: preparing")
    runners: dict[str, Step] = {}
    errors: dict[str, str] = {}
    for be in members:
        for kind in KINDS:
            key = f"{be.name}|{kind}"
            try:
                runners[key] = be.factory(kind, batch)
            except Exception as exc:
                errors[key] = error_line(exc)
                log(f"latency {be.name} batch {batch}: {kind} failed: {errors[key]}")
    samples: dict[str, list[float]] = {}
    loop_error = ""
    if runners:
        # The budget is per backend: a group of two gets twice the time.
        group_plan = replace(plan, budget_s=plan.budget_s * len(members))
        try:
            samples = interleaved(runners, group_plan, label)
        except Exception as exc:
            loop_error = error_line(exc)
    out: dict[str, Result] = {}
    for be in members:
        res: Result = {"batch": batch}
        errs = [f"{k.split('|')[1]}: {v}" for k, v in errors.items() if k.startswith(be.name + "|")]
        if loop_error:
            errs.append(loop_error)
        for kind in KINDS:
            got = samples.get(f"{be.name}|{kind}")
            if got:
                st = latency_stats(got)
                st["per_image_ms"] = st["median_ms"] / batch
                st["images_per_s"] = 1e3 * batch / st["median_ms"] if st["median_ms"] > 0 else None
                res[kind] = st
            else:
                res[kind] = {"error": errors.get(f"{be.name}|{kind}", loop_error or "not measured")}
        if errs:
            res["error"] = "; ".join(errs)
        p, v = samples.get(f"{be.name}|pouta"), samples.get(f"{be.name}|vanilla")
        if p and v:
            res["ratio_median"] = ratio(res["pouta"]["median_ms"], res["vanilla"]["median_ms"])
            res["ratio_paired"] = paired_ratio(p, v)
            log(
                f"latency {be.name} batch {batch}: pouta {res['pouta']['median_ms']:.2f} ms, "
                f"vanilla {res['vanilla']['median_ms']:.2f} ms (median), ratio {res['ratio_median']:.3f}"
            )
        out[be.name] = res
    return out, samples


def _summarise(
    results: dict[str, Result],
    batches: list[int],
    paired_int8: dict[str, dict[str, float | None]],
    paper_setting: bool,
) -> Result:
    """Targets; they are judged only at the paper's setting (preset paper, 224x224)."""
    note = "" if paper_setting else "not the paper setting (preset paper, 224x224): not judged"
    targets: list[dict[str, Any]] = []
    for name, entry in results.items():
        if entry.get("status") not in ("ok", "partial"):
            continue
        for b in batches:
            r = entry["batches"].get(str(b), {}).get("ratio_median")
            targets.append(
                {
                    "target": f"POUTA/vanilla latency ratio <= {TARGET_LATENCY_RATIO:.2f} ({name}, batch {b})",
                    "value": None if r is None else f"{r:.3f} (paper {PAPER_LATENCY_RATIO:.3f})",
                    "met": None if r is None or not paper_setting else r <= TARGET_LATENCY_RATIO,
                    "note": note,
                }
            )
    int8_ratios: dict[str, dict[str, float | None]] = {}
    fp32, int8 = results.get("ort-cpu-fp32"), results.get("ort-cpu-int8")
    for b in batches:
        for kind in KINDS:
            f = (fp32 or {}).get("batches", {}).get(str(b), {}).get(kind, {}).get("median_ms")
            q = (int8 or {}).get("batches", {}).get(str(b), {}).get(kind, {}).get("median_ms")
            r = ratio(q, f)
            int8_ratios.setdefault(str(b), {})[kind] = r
            rp = paired_int8.get(str(b), {}).get(kind)
            if f is not None or q is not None:
                targets.append(
                    {
                        "target": f"ORT CPU INT8/FP32 latency <= {TARGET_INT8_RATIO:.2f} ({kind}, batch {b})",
                        "value": None
                        if r is None
                        else f"{r:.3f} (paired {rp:.3f})"
                        if rp is not None
                        else f"{r:.3f}",
                        "met": None if r is None or not paper_setting else r <= TARGET_INT8_RATIO,
                        "note": note,
                    }
                )
    return {"int8_fp32_ratio": int8_ratios, "targets": targets}
