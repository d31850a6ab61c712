"""Derived artifacts for the benchmark: INT8 ONNX files and TensorRT engines.

Built through ``pouta.calibration`` (the same code a user runs), cached beside the FP32
file so the latency and accuracy sections do not quantize the same model twice.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from .common import error_line, log

CPU_SUFFIX = ".int8.onnx"
TRT_SUFFIX = ".int8.trt.onnx"


def _artifact(fp32: Path, suffix: str) -> Path:
    stem = fp32.name[: -len(".onnx")] if fp32.name.endswith(".onnx") else fp32.name
    return fp32.with_name(stem + suffix)


def int8_unavailable(target: str = "int8") -> str | None:
    try:
        importlib.import_module("pouta.calibration.artifacts.quantize")
        importlib.import_module("pouta.calibration.calibset")
    except ImportError as exc:
        return f"pouta.calibration cannot quantize: {error_line(exc)}"
    return None


def int8_onnx(fp32: Path, calib_dir: Path | None, target: str = "int8", n_calib: int | None = None) -> Path:
    """``target`` "int8": the u8s8 CPU file; "int8-trt": the s8s8 Q/DQ file for TensorRT.

    ``n_calib``: calibration images (None: the calibration module's default). Latency does
    not depend on the calibration, so the latency section passes a small number.
    """
    if calib_dir is None:
        raise ValueError("INT8 needs a folder of normal calibration images (--calib)")
    cpu, trt = _artifact(fp32, CPU_SUFFIX), _artifact(fp32, TRT_SUFFIX)
    want = trt if target == "int8-trt" else cpu
    if want.is_file() and Path(f"{want}.json").is_file():
        return want
    log(f"  quantizing {fp32.name} -> {cpu.name}, {trt.name} (calibration: {calib_dir})")
    from pouta.calibration.calibset import DEFAULT_N_CALIB
    from pouta.calibration.steps import CalibOptions, build_portable

    # Exactly what `pouta-build-engine --int8` does (same calibration inputs, synthetic
    # defect share, sidecars and thresholds), so benchmark accuracy is what users get.
    # ONNX Runtime's quantizer logs a root-logger warning per tensor it skips (shape
    # tensors): hundreds of lines that bury the benchmark's progress output.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        opts = CalibOptions(calib_dir=Path(calib_dir), n_calib=n_calib or DEFAULT_N_CALIB, min_calib=4)
        build_portable(fp32, opts, fp16=False, int8=True, log=lambda msg: log(f"    {msg}"))
    finally:
        root.setLevel(level)
    return want


def trt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
    except ImportError:
        pass
    for mod in (
        "pouta.edge.backends.tensorrt",
        "pouta.calibration.engines.tensorrt",
        "pouta.calibration.artifacts.fp16",
    ):
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            return f"{mod}: {error_line(exc)}"
    return None


def fp16_onnx(fp32: Path) -> Path:
    """The FP16 ONNX (FP32 I/O) that strongly typed TensorRT (10+) builds FP16 engines from."""
    from pouta.calibration.artifacts.fp16 import convert_to_fp16

    out = _artifact(fp32, ".fp16.onnx")
    if not out.is_file():
        log(f"  converting {fp32.name} -> {out.name}")
        convert_to_fp16(fp32, out)
    return out


def trt_engine(fp32: Path, precision: str, calib_dir: Path | None, batch: int) -> Path:
    """A TensorRT plan for ``fp32`` at ``precision`` with a fixed batch (min = opt = max)."""
    from pouta.calibration.engines.tensorrt import BuildRequest, build_engine, plan_build, tensorrt_version
    from pouta.edge.contract.metadata import load_for_model

    stem = fp32.name[: -len(".onnx")] if fp32.name.endswith(".onnx") else fp32.name
    plan_path = fp32.with_name(f"{stem}.{precision}.b{batch}.plan")
    if plan_path.is_file() and Path(f"{plan_path}.json").is_file():
        return plan_path
    meta = load_for_model(fp32)
    version = tensorrt_version()
    if version is None:
        raise RuntimeError("tensorrt is not installed")
    req = BuildRequest(
        precision=precision,
        height=meta.input.height,
        width=meta.input.width,
        onnx_fp32=fp32,
        onnx_fp16=fp16_onnx(fp32) if precision == "fp16" else None,
        onnx_int8_qdq=int8_onnx(fp32, calib_dir, target="int8-trt") if precision == "int8" else None,
        min_batch=batch,
        opt_batch=batch,
        max_batch=batch,
    )
    plan = plan_build(version, req)
    log(f"  building TensorRT {precision} engine {plan_path.name} (can take minutes)")
    res = build_engine(plan, plan_path, log=log)
    derived = meta.derive(
        precision=precision,
        parent_artifact=plan.onnx.name,
        build={**plan.describe(), "precision_counts": res.precision_counts},
    )
    derived.save(f"{plan_path}.json")
    return plan_path


def trt_backend(fp32: Path, precision: str, calib_dir: Path | None, batch: int) -> Any:
    from pouta.edge.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(trt_engine(fp32, precision, calib_dir, batch), max_batch=batch)
