"""TensorRT build planning per version (pure python), engine inspection parsing, and the
executor against a fake ``tensorrt`` written from its documented API (tests/fake_tensorrt.py).
Tests that need the real TensorRT and a GPU skip with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_tensorrt import install_gpu_stack
from pouta.calibration.engines.inspector import check_precisions, layer_precisions
from pouta.calibration.engines.tensorrt import (
    BuildRequest,
    build_engine,
    plan_build,
    tensorrt_version,
    trtexec_command,
)
from pouta.calibration.errors import CalibrationError
from pouta.edge.doctor import tensorrt_problem

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


def test_int8_without_qdq_is_refused_on_86_too() -> None:
    with pytest.raises(CalibrationError, match="Q/DQ"):
        plan_build("8.6.1", _req("int8", onnx_int8_qdq=None))


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_strongly_typed_versions_need_the_typed_onnx(version: str) -> None:
    with pytest.raises(CalibrationError, match="Q/DQ"):
        plan_build(version, _req("int8", onnx_int8_qdq=None))
    with pytest.raises(CalibrationError, match="FP16 ONNX"):
        plan_build(version, _req("fp16", onnx_fp16=None))


def test_profile_workspace_version_compatible() -> None:
    plan = plan_build(
        "10.3.0",
        _req(
            "fp16",
            min_batch=1,
            opt_batch=2,
            max_batch=4,
            workspace_mb=256,
            version_compatible=True,
            timing_cache=Path("t.cache"),
        ),
    )
    assert plan.profile["image"] == ((1, 3, 64, 96), (2, 3, 64, 96), (4, 3, 64, 96))
    assert plan.workspace_bytes == 256 << 20
    assert plan.version_compatible and "VERSION_COMPATIBLE" in plan.builder_flags
    assert plan.timing_cache == Path("t.cache")
    assert json.loads(json.dumps(plan.describe()))["version_compatible"] is True  # goes into the sidecar


@pytest.mark.parametrize(
    ("version", "precision", "batches", "match"),
    [
        ("8.6.2", "int8", (1, 1, 1), "DLA does not take Q/DQ"),
        ("10.3.0", "fp16", (1, 1, 1), "11.4.1"),
        ("10.3.0", "int8", (1, 1, 1), "11.4.1"),
        ("11.4.0", "int8", (1, 1, 1), "11.4.1"),
        ("11.5.0", "fp16", (1, 1, 1), "does not support JetPack"),
        ("11.5.0", "int8", (2, 2, 2), "does not support JetPack"),
        ("11.4.1", "fp16", (1, 2, 4), "min = opt = max"),
        ("8.6.2", "fp16", (1, 1, 2), "min = opt = max"),
    ],
)
def test_dla_refused_where_it_cannot_work(
    version: str, precision: str, batches: tuple[int, int, int], match: str
) -> None:
    mn, opt, mx = batches
    with pytest.raises(CalibrationError, match=match):
        plan_build(version, _req(precision, dla_core=0, min_batch=mn, opt_batch=opt, max_batch=mx))


@pytest.mark.parametrize(
    ("version", "precision"), [("8.6.2", "fp16"), ("11.4.1", "int8"), ("11.4.1", "fp16")]
)
def test_dla_where_documented(version: str, precision: str) -> None:
    plan = plan_build(version, _req(precision, dla_core=1, min_batch=2, opt_batch=2, max_batch=2))
    assert plan.dla_core == 1 and "GPU_FALLBACK" in plan.builder_flags


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


def test_all_fp32_engine_fails_loudly_when_fp16_was_asked_on_strongly_typed() -> None:
    with pytest.raises(CalibrationError, match="every engine layer runs in FP32"):
        check_precisions({"a": "fp32", "b": "fp32"}, "fp16", trt_major=10)
    with pytest.raises(CalibrationError, match="no engine layer runs in INT8"):
        check_precisions({"a": "fp16"}, "int8", trt_major=11)
    with pytest.raises(CalibrationError, match="no engine layer runs in INT8"):
        check_precisions({"a": "fp16"}, "int8", trt_major=8)
    assert check_precisions({"a": "int8", "b": "fp32"}, "int8") == ({"int8": 1, "fp32": 1}, [])


def test_fp16_allowed_not_forced_on_86_and_myelin_are_warnings() -> None:
    counts, warnings = check_precisions({"a": "fp32", "b": "fp32"}, "fp16", trt_major=8)
    assert counts == {"fp32": 2} and len(warnings) == 1 and "allowed, not required" in warnings[0]
    fused = "{ForeignNode[conv...score]}"
    for major, wanted in ((10, "fp16"), (11, "int8")):
        _, warnings = check_precisions({fused: "fp32"}, wanted, trt_major=major, fused=[fused])
        assert len(warnings) == 1 and "Myelin" in warnings[0]
    # A fused layer does not excuse plain FP32 layers beside it.
    with pytest.raises(CalibrationError, match="every engine layer runs in FP32"):
        check_precisions({fused: "fp32", "conv": "fp32"}, "fp16", trt_major=10, fused=[fused])


def test_trtexec_line_builds_the_same_plan() -> None:
    plan = plan_build(
        "10.3.0",
        _req(
            "int8",
            min_batch=1,
            opt_batch=2,
            max_batch=4,
            timing_cache=Path("t.cache"),
            version_compatible=True,
        ),
    )
    line = trtexec_command(plan, Path("out dir/m.plan"))
    assert line.startswith("trtexec --onnx=m.int8.trt.onnx ")
    assert "'--saveEngine=out dir/m.plan'" in line and "--stronglyTyped" in line
    assert "--int8" not in line and "--fp16" not in line  # strongly typed: types come from the ONNX
    for flag in (
        "--minShapes=image:1x3x64x96",
        "--optShapes=image:2x3x64x96",
        "--maxShapes=image:4x3x64x96",
        "--memPoolSize=workspace:1024",
        "--timingCacheFile=t.cache",
        "--versionCompatible",
    ):
        assert flag in line.split(), flag
    trt8 = trtexec_command(plan_build("8.6.2", _req("int8")), "m.plan").split()
    assert {"--int8", "--fp16"} <= set(trt8) and "--stronglyTyped" not in trt8
    dla = trtexec_command(plan_build("8.6.2", _req("fp16", dla_core=0)), "m.plan").split()
    assert {"--fp16", "--useDLACore=0", "--allowGPUFallback"} <= set(dla) and "--int8" not in dla


# -- the executor against the fake tensorrt -------------------------------------------------


def _build(version: str, onnx: Path, tmp_path: Path, precision: str = "fp16", **kw: object) -> object:
    from pouta.calibration.artifacts.fp16 import convert_to_fp16

    fp16 = tmp_path / "m.fp16.onnx"
    if not fp16.is_file():
        convert_to_fp16(onnx, fp16)
    req = _req(precision, onnx_fp32=onnx, onnx_fp16=fp16, height=64, width=64, **kw)
    return plan_build(version, req)


def test_no_usable_gpu_is_a_clear_error_and_a_skip_reason(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    install_gpu_stack(monkeypatch, "10.3.0", present=False)
    reason = tensorrt_problem()
    assert reason is not None and "no usable CUDA GPU" in reason and "nullptr" in reason
    with pytest.raises(CalibrationError, match="no usable CUDA GPU"):
        build_engine(_build("10.3.0", brightness_onnx, tmp_path), tmp_path / "m.plan", log=lambda _m: None)


def test_version_compatible_plan_is_built_and_inspected(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    _, fake = install_gpu_stack(monkeypatch, "10.3.0")
    plan = _build("10.3.0", brightness_onnx, tmp_path, version_compatible=True)
    result = build_engine(plan, tmp_path / "m.plan", log=lambda _m: None)
    assert result.path.is_file() and result.layer_precisions
    assert not [m for m in fake.log if "host code" in m]


def test_fp16_on_86_that_stays_fp32_builds_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    _, fake = install_gpu_stack(monkeypatch, "8.6.1")
    fake.fp16_choice = "fp32"
    logs: list[str] = []
    result = build_engine(_build("8.6.1", brightness_onnx, tmp_path), tmp_path / "m.plan", log=logs.append)
    assert set(result.precision_counts) == {"fp32"} and result.path.is_file()
    assert any("allowed, not required" in m for m in logs) and result.warnings


def test_fused_myelin_engine_builds_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    _, fake = install_gpu_stack(monkeypatch, "11.4.0")
    fake.fuse_into_myelin = True
    result = build_engine(
        _build("11.4.0", brightness_onnx, tmp_path), tmp_path / "m.plan", log=lambda _m: None
    )
    assert len(result.layer_precisions) == 1 and "ForeignNode" in next(iter(result.layer_precisions))
    assert result.warnings and "Myelin" in result.warnings[0]


@pytest.mark.parametrize("cache_kind", ["foreign", "corrupt"])
def test_timing_cache_refused_or_corrupt_starts_fresh_and_keeps_the_plan(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path, cache_kind: str
) -> None:
    cache = tmp_path / "t.cache"
    if cache_kind == "foreign":  # a cache saved on another GPU
        install_gpu_stack(monkeypatch, "10.3.0", name="Other GPU")
        build_engine(
            _build("10.3.0", brightness_onnx, tmp_path, timing_cache=cache),
            tmp_path / "o.plan",
            log=lambda _m: None,
        )
    else:
        cache.write_bytes(b"\x00garbage")
    _, fake = install_gpu_stack(monkeypatch, "10.3.0")
    logs: list[str] = []
    plan = _build("10.3.0", brightness_onnx, tmp_path, timing_cache=cache)
    result = build_engine(plan, tmp_path / "m.plan", log=logs.append)
    assert result.path.is_file()
    assert any("timing cache" in m and "fresh" in m for m in logs), logs
    # The fresh cache was saved and is accepted by this GPU next time (and reused).
    build_engine(plan, tmp_path / "m2.plan", log=logs.append)
    assert fake.cache_hits == [0, 1]


def test_lost_timing_cache_never_loses_the_plan(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    from fake_tensorrt import make_tensorrt

    dev, fake = install_gpu_stack(monkeypatch, "10.3.0")
    trt = make_tensorrt(dev, fake)
    # TensorRT documents getTimingCache as returning nullptr when the config holds none.
    config_cls = type(trt.Builder(trt.Logger()).create_builder_config())
    monkeypatch.setattr(config_cls, "get_timing_cache", lambda self: None)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    logs: list[str] = []
    plan = _build("10.3.0", brightness_onnx, tmp_path, timing_cache=tmp_path / "t.cache")
    result = build_engine(plan, tmp_path / "m.plan", log=logs.append)
    assert result.path.is_file() and not (tmp_path / "t.cache").exists()
    assert any("no timing cache" in m for m in logs)


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_fake_inspector_follows_profiling_verbosity(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path, version: str
) -> None:
    """The fake says only what TensorRT documents: names only by default, types with DETAILED."""
    from pouta.calibration.artifacts.fp16 import convert_to_fp16

    install_gpu_stack(monkeypatch, version)
    import tensorrt as trt

    fp16 = convert_to_fp16(brightness_onnx, tmp_path / "m.fp16.onnx")

    def inspect(verbosity: object) -> dict:
        builder = trt.Builder(trt.Logger())
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        assert trt.OnnxParser(network, trt.Logger()).parse_from_file(str(fp16))
        config = builder.create_builder_config()
        if verbosity is not None:
            config.profiling_verbosity = verbosity
        profile = builder.create_optimization_profile()
        profile.set_shape("image", (1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64))
        config.add_optimization_profile(profile)
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
            builder.build_serialized_network(network, config)
        )
        return json.loads(
            engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        )

    default = inspect(None)
    assert default["Layers"] and all(isinstance(name, str) for name in default["Layers"])
    assert set(layer_precisions(json.dumps(default)).values()) == {"unknown"}
    detailed = inspect(trt.ProfilingVerbosity.DETAILED)
    assert [layer["Name"] for layer in detailed["Layers"]] == default["Layers"]
    assert "fp16" in layer_precisions(json.dumps(detailed)).values()
    assert inspect(trt.ProfilingVerbosity.NONE)["Layers"] == []
    if version.startswith("11."):
        assert "Bindings" not in detailed
        io = {t["Name"]: t["IOMode"] for t in detailed["I/O Tensors"]}
        assert io == {"image": "Input", "anomaly_map": "Output", "score": "Output"}
    else:
        assert "I/O Tensors" not in detailed
        assert set(detailed["Bindings"]) == {"image", "anomaly_map", "score"}


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0", "11.4.0"])
def test_built_engine_reports_every_layer_precision(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path, version: str
) -> None:
    """build_engine asks for DETAILED inspector output: without it every layer is 'unknown'
    and an FP16 build could not be told from an FP32 one."""
    install_gpu_stack(monkeypatch, version)
    result = build_engine(
        _build(version, brightness_onnx, tmp_path), tmp_path / "m.plan", log=lambda _m: None
    )
    assert result.layer_precisions and "unknown" not in result.layer_precisions.values()
    assert result.precision_counts.get("fp16", 0) > 0 and result.warnings == []


def test_dla_builds_only_on_releases_that_have_it(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    import dataclasses

    install_gpu_stack(monkeypatch, "11.4.1", dla_cores=2)
    plan = _build("11.4.1", brightness_onnx, tmp_path, dla_core=1)
    assert build_engine(plan, tmp_path / "dla.plan", log=lambda _m: None).path.is_file()
    # 11.5.0 has no JetPack, so no DLA on Orin: plan_build refuses, and so does TensorRT.
    with pytest.raises(CalibrationError, match="does not support JetPack"):
        _build("11.5.0", brightness_onnx, tmp_path, dla_core=1)
    _, fake = install_gpu_stack(monkeypatch, "11.5.0", dla_cores=2)
    with pytest.raises(CalibrationError, match="engine build failed"):
        build_engine(
            dataclasses.replace(plan, trt_version="11.5.0"), tmp_path / "x.plan", log=lambda _m: None
        )
    assert any("DLA is not supported" in m for m in fake.log)


# -- real TensorRT on a real GPU ----------------------------------------------------------

_NO_TRT = tensorrt_problem()


def qdq_model(fp32: Path, tmp_path: Path) -> Path:
    """The INT8 Q/DQ file exactly as pouta-build-engine --int8 writes it."""
    import cv2
    import numpy as np
    from contract_models import dark_part
    from pouta.calibration.steps import CalibOptions, build_portable

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        cv2.imwrite(str(calib / f"{i:02d}.png"), dark_part(64, 64, rng, False))
    opts = CalibOptions(calib_dir=calib, n_calib=16, min_calib=8)
    return build_portable(fp32, opts, fp16=False, int8=True, log=lambda _m: None).artifacts["int8-trt"]


@pytest.mark.trt
@pytest.mark.skipif(_NO_TRT is not None, reason=f"needs TensorRT and a usable CUDA GPU: {_NO_TRT}")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_real_engine(
    brightness_onnx: Path, tmp_path: Path, precision: str
) -> None:  # pragma: no cover - GPU only
    from pouta.calibration.artifacts.fp16 import convert_to_fp16

    fp16 = convert_to_fp16(brightness_onnx, tmp_path / "model.fp16.onnx")
    qdq = qdq_model(brightness_onnx, tmp_path) if precision == "int8" else None
    cache = tmp_path / "t.cache"
    req = _req(
        precision,
        onnx_fp32=brightness_onnx,
        onnx_fp16=fp16,
        onnx_int8_qdq=qdq,
        height=64,
        width=64,
        timing_cache=cache,
        version_compatible=True,
    )
    plan = plan_build(str(tensorrt_version()), req)
    result = build_engine(plan, tmp_path / "model.plan")
    assert result.path.stat().st_size > 0 and cache.stat().st_size > 0
    assert "unknown" not in result.layer_precisions.values()  # DETAILED inspector output
    # Only the two documented excuses may stand in for layers in the asked precision.
    excused = any("Myelin" in w for w in result.warnings) or (
        plan.trt_major == 8
        and precision == "fp16"
        and any("allowed, not required" in w for w in result.warnings)
    )
    assert result.precision_counts.get(precision, 0) > 0 or excused, (
        result.precision_counts,
        result.warnings,
    )
    again = build_engine(plan, tmp_path / "model2.plan")  # reuses the timing cache
    assert again.path.stat().st_size > 0


def test_build_engine_cli_speaks_trtexec(capsys: pytest.CaptureFixture[str]) -> None:
    from pouta.calibration import cli

    with pytest.raises(SystemExit):
        cli.build_engine_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--saveEngine", "--timingCacheFile", "--useDLACore", "--versionCompatible"):
        assert flag in out, flag
    assert "not a calibration cache file as trtexec's --calib is" in out
