"""TensorRT backend: buffer sizing and metadata checks, the backend and the threaded pipeline
against fake ``tensorrt`` / cuda-python / pycuda modules written from their documented
behaviour (tests/fake_*.py), the doctor, the install pins; real-GPU tests skip with the reason."""

from __future__ import annotations

import configparser
import importlib.util
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fake_tensorrt import install_gpu_stack
from pouta.edge.backends.cuda_memory import CudaError, open_cuda_memory
from pouta.edge.backends.tensorrt import (
    TensorRTBackend,
    buffer_nbytes,
    check_engine_tensors,
    numpy_dtype,
    plan_buffers,
)
from pouta.edge.contract.errors import ConfigError, MetadataError
from pouta.edge.contract.metadata import InputSpec, ModelMetadata
from pouta.edge.doctor import jetpack_from_l4t, tensorrt_problem

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


ROOT = Path(__file__).resolve().parents[1]


def build_plan(onnx: Path, tmp_path: Path, name: str = "m.plan", max_batch: int = 2, **kw: object) -> Path:
    """A plan + sidecar through pouta's own build path (fake or real TensorRT)."""
    import tensorrt
    from pouta.calibration.artifacts.fp16 import convert_to_fp16
    from pouta.calibration.engines.tensorrt import BuildRequest, build_engine, plan_build
    from pouta.edge.contract.metadata import load_for_model, metadata_path

    fp16 = tmp_path / "m.fp16.onnx"
    if not fp16.is_file():
        convert_to_fp16(onnx, fp16)
    req = BuildRequest(
        precision="fp16", height=64, width=64, onnx_fp32=onnx, onnx_fp16=fp16, max_batch=max_batch, **kw
    )  # type: ignore[arg-type]
    plan = plan_build(tensorrt.__version__, req)
    out = build_engine(plan, tmp_path / name, log=lambda _m: None).path
    meta = load_for_model(onnx)
    meta.precision = "fp16"
    meta.build = plan.describe()
    meta.save(metadata_path(out))
    return out


def exercise(plan: Path, onnx: Path, cuda: str | None) -> None:
    """Open in this thread, run in a worker thread (as the pipeline does), change batch, close."""
    from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend

    backend = TensorRTBackend(plan, cuda=cuda)
    ort = OnnxRuntimeBackend(onnx)
    rng = np.random.default_rng(0)
    results: list[object] = []

    def worker() -> None:
        try:
            for n in (1, 2, 1):
                batch = rng.random((n, 3, 64, 64), dtype=np.float32)
                results.append((backend.run(batch), ort.run(batch)))
        except Exception as exc:  # reported below, in the test's thread
            results.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    backend.close()
    for r in results:
        assert not isinstance(r, Exception), r
        (tmap, tscore), (omap, oscore) = r  # type: ignore[misc]
        assert tmap.shape == omap.shape
        np.testing.assert_allclose(tmap, omap, atol=2e-2)
        np.testing.assert_allclose(tscore, oscore, atol=2e-2)
    assert len(results) == 3


# -- fake tensorrt + CUDA bindings (contracts) -------------------------------------------


@pytest.mark.parametrize("cuda", ["cuda-python", "pycuda"])
def test_backend_in_worker_thread_with_batch_changes(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path, cuda: str
) -> None:
    gpu, fake = install_gpu_stack(
        monkeypatch, "10.3.0", pycuda=cuda == "pycuda", cuda_python=cuda == "cuda-python"
    )
    plan = build_plan(brightness_onnx, tmp_path)
    exercise(plan, brightness_onnx, cuda)
    assert gpu.live() == {"device": 0, "host": 0, "streams": 0}, fake.log


def test_pycuda_backend_in_the_real_pipeline(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    from pouta.edge.config import build_pipeline
    from test_edge_runtime import make_folder, run_cfg

    install_gpu_stack(monkeypatch, "10.3.0", pycuda=True, cuda_python=False)
    plan = build_plan(brightness_onnx, tmp_path)
    images = make_folder(tmp_path / "test", 3, 3, size=64)
    pipe = build_pipeline(run_cfg(plan, images, tmp_path / "out"))
    assert pipe.backend.name == "tensorrt:pycuda"
    s = pipe.run()
    pipe.backend.close()
    assert s["processed"] == 6 and s["frame_errors"] == 0 and s["correct"] == 6, s


def test_version_compatible_plan_needs_host_code_allowed(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    from pouta.edge.contract.metadata import load_for_model, metadata_path

    _, fake = install_gpu_stack(monkeypatch, "10.3.0")
    plan = build_plan(brightness_onnx, tmp_path, version_compatible=True)
    exercise(plan, brightness_onnx, None)
    # The same plan with a sidecar that does not say so: a clear error, not a crash.
    meta = load_for_model(plan)
    meta.build = {}
    meta.save(metadata_path(plan))
    with pytest.raises(MetadataError, match="version-compatible without the sidecar"):
        TensorRTBackend(plan)
    assert any("host code" in m for m in fake.log)


def test_plan_from_another_gpu_model_warns_another_architecture_refuses(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    install_gpu_stack(monkeypatch, "10.3.0", name="Jetson AGX Orin 64GB", compute_capability=(8, 7))
    plan = build_plan(brightness_onnx, tmp_path)
    # Same architecture, another model: TensorRT loads it and warns.
    _, fake = install_gpu_stack(monkeypatch, "10.3.0", name="Jetson Orin NX 16GB", compute_capability=(8, 7))
    exercise(plan, brightness_onnx, None)
    assert any("different models of devices" in m for m in fake.log), fake.log
    # Another architecture: refused, and the backend says to rebuild on this device.
    _, fake = install_gpu_stack(monkeypatch, "10.3.0", name="RTX 4090", compute_capability=(8, 9))
    with pytest.raises(MetadataError, match="rebuild it on this device"):
        TensorRTBackend(plan)
    assert any("incompatible device" in m for m in fake.log), fake.log


def test_rejected_batch_keeps_the_backend_usable_and_nothing_leaks(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    gpu, _ = install_gpu_stack(monkeypatch, "10.3.0")
    plan = build_plan(brightness_onnx, tmp_path, max_batch=2)
    backend = TensorRTBackend(plan)
    x = np.zeros((2, 3, 64, 64), np.float32)
    for n in (1, 2, 1, 2):
        backend.run(x[:n])
        assert gpu.live() == {"device": 3, "host": 3, "streams": 1}  # one buffer pair per tensor
    with pytest.raises(MetadataError, match="outside its optimization profile"):
        backend.run(np.zeros((3, 3, 64, 64), np.float32))
    amap, score = backend.run(x)  # the last good batch size still runs
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    backend.close()
    assert gpu.live() == {"device": 0, "host": 0, "streams": 0}


def test_failing_open_releases_the_stream(
    monkeypatch: pytest.MonkeyPatch, brightness_onnx: Path, tmp_path: Path
) -> None:
    from pouta.edge.contract.metadata import load_for_model

    gpu, _ = install_gpu_stack(monkeypatch, "10.3.0")
    plan = build_plan(brightness_onnx, tmp_path)
    wrong = load_for_model(plan)
    wrong.input = InputSpec(96, 96)
    with pytest.raises(MetadataError, match="96"):
        TensorRTBackend(plan, metadata=wrong)
    assert gpu.live() == {"device": 0, "host": 0, "streams": 0}


def test_cuda13_binding_on_cuda12_driver_falls_back_or_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_gpu_stack(monkeypatch, "10.3.0", cuda_major=13, pycuda=True, driver_version=12060)
    mem = open_cuda_memory(None)
    assert mem.name == "pycuda"
    mem.close()
    install_gpu_stack(monkeypatch, "10.3.0", cuda_major=13, pycuda=False, driver_version=12060)
    with pytest.raises(CudaError, match=r"cudaErrorInsufficientDriver.*cuda-python>=12\.6,<13"):
        open_cuda_memory(None)


def test_trt_extra_pins_a_cuda12_binding_per_platform() -> None:
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]

    def resolved(extra: str, machine: str) -> dict[str, Requirement]:
        env = {"platform_machine": machine, "sys_platform": "linux"}
        reqs = [Requirement(line) for line in extras[extra].strip().splitlines() if line.strip()]
        return {r.name: r for r in reqs if r.marker is None or r.marker.evaluate(env)}

    for machine in ("x86_64", "aarch64"):
        cuda12 = resolved("trt", machine)["cuda-python"].specifier
        assert cuda12.contains("12.9.0") and not cuda12.contains("13.0.0"), machine
        cuda13 = resolved("trt-cu13", machine)["cuda-python"].specifier
        assert cuda13.contains("13.0.0") and not cuda13.contains("12.9.0"), machine
    # Jetson (aarch64) takes TensorRT from JetPack, never from PyPI.
    assert "tensorrt-cu12" in resolved("trt", "x86_64") and "tensorrt-cu13" in resolved("trt-cu13", "x86_64")
    assert not [n for n in resolved("trt", "aarch64") if n.startswith("tensorrt")]


def test_doctor_names_versions_backend_and_reasons(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], brightness_onnx: Path, tmp_path: Path
) -> None:
    from pouta.edge import cli

    install_gpu_stack(monkeypatch, "10.3.0", cuda_major=13, pycuda=True, driver_version=12060)
    plan = build_plan(brightness_onnx, tmp_path)
    assert cli.main(["doctor", "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ok +tensorrt: 10\.3\.0", out, re.M), out
    assert re.search(r"^ok +cuda driver: CUDA 12\.6", out, re.M), out
    assert re.search(
        r"^-- +cuda-python: 13\.0\.1 installed, but unusable: .*InsufficientDriver", out, re.M
    ), out
    assert re.search(r"^ok +\.plan backend: tensorrt:pycuda", out, re.M), out
    assert re.search(r"^ok +plan: .*opens with tensorrt:pycuda", out, re.M), out
    install_gpu_stack(monkeypatch, "10.3.0", present=False)
    assert cli.main(["doctor"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"^-- +tensorrt: .*no usable CUDA GPU", out, re.M), out
    assert ".plan files cannot run here" in out


def test_doctor_reads_the_jetpack_release() -> None:
    r36 = "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: x"
    assert (jetpack_from_l4t(r36) or "").startswith("JetPack 6.x (L4T R36.4.0)")
    assert "too old" in (jetpack_from_l4t("# R35 (release), REVISION: 4.1, GCID: 1") or "")
    assert jetpack_from_l4t("not a tegra release file") is None


def _jetpack_rows() -> list[tuple[str, str, str, bool]]:
    """(JetPack, L4T, TensorRT, plans supported) from the table in docs/tensorrt.md."""
    rows = []
    for line in (ROOT / "docs" / "tensorrt.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"R\d+", cells[1]):
            rows.append((cells[0], cells[1], cells[2], not cells[3].startswith("not supported")))
    return rows


def test_jetpack_table_in_the_docs_is_what_the_code_accepts() -> None:
    from pouta.calibration.engines.tensorrt import BuildRequest, plan_build
    from pouta.calibration.errors import CalibrationError

    rows = _jetpack_rows()
    assert {r[3] for r in rows} == {True, False} and len(rows) >= 4, rows
    for jetpack, l4t, trt_version, supported in rows:
        req = BuildRequest(
            precision="fp16", height=64, width=64, onnx_fp32=Path("m.onnx"), onnx_fp16=Path("f.onnx")
        )
        if supported:
            assert plan_build(trt_version, req).trt_version == trt_version
        else:
            with pytest.raises(CalibrationError, match="too old"):
                plan_build(trt_version, req)
        said = jetpack_from_l4t(f"# {l4t} (release), REVISION: 1.0, GCID: 1, BOARD: generic") or ""
        assert said.startswith(f"JetPack {jetpack[0]}."), (jetpack, said)
        assert ("too old" in said) == (not supported), (jetpack, said)


# -- real TensorRT on a real GPU -------------------------------------------------------------

_NO_TRT = tensorrt_problem()
_REAL = pytest.mark.skipif(_NO_TRT is not None, reason=f"needs TensorRT and a usable CUDA GPU: {_NO_TRT}")


@pytest.mark.trt
@_REAL
@pytest.mark.parametrize("cuda", ["cuda-python", "pycuda"])
@pytest.mark.parametrize("version_compatible", [False, True])
def test_real_plan_in_worker_thread_batch_change_close(
    brightness_onnx: Path, tmp_path: Path, cuda: str, version_compatible: bool
) -> None:  # pragma: no cover - GPU only
    if importlib.util.find_spec("pycuda" if cuda == "pycuda" else "cuda") is None:
        pytest.skip(f"{cuda} is not installed")
    cache = tmp_path / "t.cache"
    plan = build_plan(brightness_onnx, tmp_path, version_compatible=version_compatible, timing_cache=cache)
    exercise(plan, brightness_onnx, cuda)
    assert cache.stat().st_size > 0  # a second build reads the saved timing cache
    exercise(build_plan(brightness_onnx, tmp_path, "m2.plan", timing_cache=cache), brightness_onnx, cuda)


@pytest.mark.trt
@_REAL
def test_real_int8_plan_from_the_qdq_file(brightness_onnx: Path, tmp_path: Path) -> None:  # pragma: no cover
    from pouta.calibration.engines.tensorrt import BuildRequest, build_engine, plan_build, tensorrt_version
    from pouta.edge.contract.metadata import load_for_model, metadata_path
    from test_build_engine import qdq_model

    qdq = qdq_model(brightness_onnx, tmp_path)
    req = BuildRequest(precision="int8", height=64, width=64, onnx_fp32=brightness_onnx, onnx_int8_qdq=qdq)
    plan = plan_build(str(tensorrt_version()), req)
    result = build_engine(plan, tmp_path / "m.int8.plan")
    assert result.precision_counts.get("int8", 0) > 0 or result.warnings
    meta = load_for_model(qdq)
    meta.build = plan.describe()
    meta.save(metadata_path(result.path))
    exercise(result.path, qdq, None)


def test_bench_runtime_smoke(brightness_onnx: Path) -> None:
    from pouta.benchmarks.sections.runtime_overhead import measure_overhead

    r = measure_overhead(brightness_onnx, frames=20, fsync=False)
    d = r["drop_test"]
    # Every part seen has exactly one record; a dropped one is NOT_INSPECTED.
    assert d["acquired"] == 20 and d["lost_result_files"] == 0
    assert d["result_files"] == d["distinct_seq"] == 20
    assert d["processed"] + d["not_inspected"] == 20
    assert d["result_files_not_inspected"] == d["not_inspected"] == d["dropped"]
    # Pre+post is real work inside the pipeline, and a frame never takes less than its backend call.
    assert r["overhead_ms"]["p50"] > 0 and r["pure_backend_ms"]["p50"] > 0
    assert r["latency_total_ms"]["p50"] >= r["pipeline_backend_ms"]["p50"]
