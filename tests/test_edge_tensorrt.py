"""TensorRT path without a GPU: buffer sizing and metadata checks; real plans skip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from pouta.edge.errors import ConfigError, MetadataError
from pouta.edge.metadata import InputSpec, ModelMetadata
from pouta.edge.tensorrt_backend import (
    TensorRTBackend,
    buffer_nbytes,
    check_engine_tensors,
    numpy_dtype,
    plan_buffers,
)

F32 = np.dtype(np.float32)


def tensors(h: int = 64, w: int = 64, dtype: np.dtype = F32) -> dict:
    return {
        "image": ((-1, 3, h, w), dtype, True),
        "anomaly_map": ((-1, 1, h, w), F32, False),
        "score": ((-1,), F32, False),
    }


def test_buffer_sizes_from_shapes() -> None:
    plan = plan_buffers(tensors(), batch=2)
    assert plan["image"] == ((2, 3, 64, 64), F32, 2 * 3 * 64 * 64 * 4)
    assert plan["score"][2] == 8
    assert buffer_nbytes((1, 3, 224, 224), np.dtype(np.float16)) == 3 * 224 * 224 * 2
    with pytest.raises(MetadataError, match="dynamic"):
        plan_buffers({"image": ((1, 3, -1, 64), F32, True)}, 1)


def test_dtype_names() -> None:
    class D:
        name = "HALF"

    assert numpy_dtype(D()) == np.float16 and numpy_dtype("DataType.FLOAT") == np.float32
    with pytest.raises(MetadataError):
        numpy_dtype("FP8")


def test_engine_tensors_checked_against_metadata() -> None:
    meta = ModelMetadata(model_kind="test", input=InputSpec(96, 96))
    with pytest.raises(MetadataError, match="96"):
        check_engine_tensors(meta, tensors(64, 64), "m.plan")
    with pytest.raises(MetadataError, match="float32"):
        check_engine_tensors(
            ModelMetadata(model_kind="test", input=InputSpec(64, 64)),
            tensors(dtype=np.dtype(np.float16)),
            "m.plan",
        )
    check_engine_tensors(ModelMetadata(model_kind="test", input=InputSpec(64, 64)), tensors(), "m.plan")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_plan_without_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    ModelMetadata(model_kind="test", input=InputSpec(64, 64)).save(f"{plan}.json")
    with pytest.raises(ConfigError, match="tensorrt"):
        TensorRTBackend(plan)


def _cuda_device_usable() -> bool:
    try:
        from pouta.edge.cuda_memory import open_cuda_memory

        open_cuda_memory(None)
    except Exception:
        return False
    return True


@pytest.mark.trt
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not _cuda_device_usable(),
    reason="needs TensorRT and a CUDA GPU (cuda-python or pycuda); neither is in this workplace",
)
def test_fp16_plan_matches_onnxruntime(brightness_onnx: Path, tmp_path: Path) -> None:  # pragma: no cover
    from pouta.calibration.fp16 import convert_to_fp16
    from pouta.calibration.tensorrt_build import BuildRequest, build_engine, plan_build, tensorrt_version
    from pouta.edge.backend import OnnxRuntimeBackend
    from pouta.edge.metadata import load_for_model, metadata_path

    fp16 = convert_to_fp16(brightness_onnx, tmp_path / "m.fp16.onnx")
    req = BuildRequest(
        precision="fp16", height=64, width=64, onnx_fp32=brightness_onnx, onnx_fp16=fp16, onnx_int8_qdq=None
    )
    plan = build_engine(plan_build(str(tensorrt_version()), req), tmp_path / "m.plan").path
    meta = load_for_model(brightness_onnx)
    meta.precision = "fp16"
    meta.save(metadata_path(plan))
    batch = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    trt_map, trt_score = TensorRTBackend(plan).run(batch)
    ort_map, ort_score = OnnxRuntimeBackend(brightness_onnx).run(batch)
    assert trt_map.shape == ort_map.shape
    np.testing.assert_allclose(trt_map, ort_map, atol=2e-2)
    np.testing.assert_allclose(trt_score, ort_score, atol=2e-2)


def test_bench_runtime_smoke(brightness_onnx: Path) -> None:
    from pouta.edge.bench_runtime import measure_overhead

    r = measure_overhead(brightness_onnx, frames=20, fsync=False)
    assert r["drop_test"]["lost_result_files"] == 0
    assert r["overhead_ms"]["p50"] >= 0 and r["pure_backend_ms"]["p50"] > 0
