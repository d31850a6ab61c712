"""TensorRT build planning per version (pure python) and engine inspection parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pouta.calibration.errors import CalibrationError
from pouta.calibration.tensorrt_build import (
    BuildRequest,
    check_precisions,
    layer_precisions,
    plan_build,
    tensorrt_version,
)

FP32, FP16, QDQ = Path("m.onnx"), Path("m.fp16.onnx"), Path("m.int8.trt.onnx")


def _req(precision: str, **kw: object) -> BuildRequest:
    base: dict[str, object] = dict(
        precision=precision, height=64, width=96, onnx_fp32=FP32, onnx_fp16=FP16, onnx_int8_qdq=QDQ
    )
    base.update(kw)
    return BuildRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "precision", "onnx", "net_flags", "builder_flags"),
    [
        ("8.6.2", "fp16", FP32, ("EXPLICIT_BATCH",), ("FP16",)),
        ("8.6.2", "int8", QDQ, ("EXPLICIT_BATCH",), ("INT8", "FP16")),
        ("8.6.2", "fp32", FP32, ("EXPLICIT_BATCH",), ()),
        ("10.3.0", "fp16", FP16, ("STRONGLY_TYPED",), ()),
        ("10.3.0", "int8", QDQ, ("STRONGLY_TYPED",), ()),
        ("11.1.0", "fp16", FP16, (), ()),
        ("11.1.0", "int8", QDQ, (), ()),
    ],
)
def test_plan_per_version(
    version: str, precision: str, onnx: Path, net_flags: tuple[str, ...], builder_flags: tuple[str, ...]
) -> None:
    plan = plan_build(version, _req(precision))
    assert plan.onnx == onnx
    assert plan.network_flags == net_flags
    assert plan.builder_flags == builder_flags
    assert plan.strongly_typed == (int(version.split(".")[0]) >= 10)
    assert not plan.use_int8_calibrator


def test_trt8_falls_back_to_calibrator_without_qdq() -> None:
    plan = plan_build("8.6.1", _req("int8", onnx_int8_qdq=None))
    assert plan.use_int8_calibrator and plan.onnx == FP32 and "INT8" in plan.builder_flags


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_strongly_typed_versions_need_the_typed_onnx(version: str) -> None:
    with pytest.raises(CalibrationError, match="Q/DQ"):
        plan_build(version, _req("int8", onnx_int8_qdq=None))
    with pytest.raises(CalibrationError, match="FP16 ONNX"):
        plan_build(version, _req("fp16", onnx_fp16=None))


def test_profile_workspace_dla_version_compatible() -> None:
    plan = plan_build(
        "10.3.0",
        _req(
            "fp16",
            min_batch=1,
            opt_batch=2,
            max_batch=4,
            workspace_mb=256,
            dla_core=0,
            version_compatible=True,
            timing_cache=Path("t.cache"),
        ),
    )
    assert plan.profile["image"] == ((1, 3, 64, 96), (2, 3, 64, 96), (4, 3, 64, 96))
    assert plan.workspace_bytes == 256 << 20
    assert plan.dla_core == 0 and "GPU_FALLBACK" in plan.builder_flags
    assert "VERSION_COMPATIBLE" in plan.builder_flags and plan.timing_cache == Path("t.cache")
    json.dumps(plan.describe())  # goes into the sidecar


@pytest.mark.parametrize(
    ("version", "kw", "match"),
    [
        ("8.5.3", {}, "too old"),
        ("x", {}, "MAJOR.MINOR"),
        ("10.3.0", {"min_batch": 4, "max_batch": 2}, "batch profile"),
        ("10.3.0", {"dla_core": 0, "precision": "fp32"}, "DLA runs FP16 or INT8"),
    ],
)
def test_plan_errors(version: str, kw: dict[str, object], match: str) -> None:
    precision = str(kw.pop("precision", "fp16"))
    with pytest.raises(CalibrationError, match=match):
        plan_build(version, _req(precision, **kw))


def test_layer_precisions_from_trt10_and_trt11_json() -> None:
    trt10 = {
        "Layers": [
            {
                "Name": "conv1",
                "Outputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            },
            {"Name": "q_conv", "Inputs": [{"Format/Datatype": "Row major Int8 format"}], "Outputs": []},
            {"Name": "pool", "Outputs": [{"Format/Datatype": "Row major linear FP32 format"}]},
        ],
        "Bindings": ["image", "anomaly_map", "score"],
    }
    assert layer_precisions(json.dumps(trt10)) == {"conv1": "fp16", "q_conv": "int8", "pool": "fp32"}
    trt11 = {
        "Layers": [{"Name": "c", "Outputs": [{"Format": "kLINEAR", "DataType": "Half"}]}],
        "I/O Tensors": [],
    }
    assert layer_precisions(json.dumps(trt11)) == {"c": "fp16"}


def test_all_fp32_engine_fails_loudly_when_fp16_was_asked() -> None:
    with pytest.raises(CalibrationError, match="every engine layer runs in FP32"):
        check_precisions({"a": "fp32", "b": "fp32"}, "fp16")
    with pytest.raises(CalibrationError, match="no engine layer runs in INT8"):
        check_precisions({"a": "fp16"}, "int8")
    assert check_precisions({"a": "int8", "b": "fp32"}, "int8") == {"int8": 1, "fp32": 1}


@pytest.mark.trt
@pytest.mark.skipif(
    tensorrt_version() is None, reason="TensorRT is not installed (needs an NVIDIA GPU/Jetson)"
)
def test_build_real_engine(brightness_onnx: Path, tmp_path: Path) -> None:
    from pouta.calibration.fp16 import convert_to_fp16
    from pouta.calibration.tensorrt_build import build_engine

    fp16 = convert_to_fp16(brightness_onnx, tmp_path / "model.fp16.onnx")
    plan = plan_build(
        str(tensorrt_version()), _req("fp16", onnx_fp32=brightness_onnx, onnx_fp16=fp16, height=64, width=64)
    )
    result = build_engine(plan, tmp_path / "model.plan")
    assert result.path.stat().st_size > 0 and result.precision_counts.get("fp16", 0) > 0
