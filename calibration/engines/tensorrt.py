"""TensorRT plan building: a pure-python ``BuildPlan`` plus a thin executor.

What differs between TensorRT versions is decided in ``plan_build`` from the version
string alone, so it is unit-tested without TensorRT or a GPU:

- 8.6 (JetPack 6.0 ships 8.6.2; JetPack 5.1 ships 8.5, which is refused): networks need
  the EXPLICIT_BATCH creation flag; precision comes from builder flags. INT8 parses the
  Q/DQ model with INT8 and FP16 set together (FP16 for the layers left unquantized).
  FP16 is only *allowed* by its flag: TensorRT may keep every layer in FP32.
- 10.x (JetPack 6.1/6.2 ships 10.3): EXPLICIT_BATCH is deprecated and ignored; the
  network is created STRONGLY_TYPED so tensor types come from the ONNX file (FP16 ONNX
  or Q/DQ ONNX) and precision flags are neither needed nor allowed.
- 11.x: BuilderFlag.FP16/INT8 and the int8 calibrator are removed and every network is
  strongly typed (the STRONGLY_TYPED flag is deprecated and ignored), so FP16 needs the
  FP16 ONNX and INT8 needs the ``.int8.trt.onnx``.
- DLA: strongly typed networks run on DLA only in 11.4.1 (JetPack 7.2.2 on Orin); 11.5.0
  does not support JetPack, so it has no DLA on Orin ("Working with DLA", 11.5.0); 8.6's
  DLA takes FP16 but no Q/DQ; DLA needs one batch size (min = opt = max).

Sources: TensorRT Python API (Builder, IBuilderConfig, Runtime, EngineInspector,
ITimingCache), "Migrating from TensorRT 10.x to 11.x", the trtexec flag reference, NVIDIA's
``samples/common/sampleEngines.cpp`` and Polygraphy's ``backend/trt/loader.py``
(``engine_host_code_allowed`` before deserializing a version-compatible plan).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pouta.edge.backends.tensorrt import MIN_TENSORRT
from pouta.edge.contract.metadata import INPUT_NAME

from ..errors import CalibrationError
from .inspector import check_precisions, fused_layer_names, layer_precisions

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 1024
# First release documenting strongly typed networks on DLA.
DLA_STRONGLY_TYPED_FROM = (11, 4, 1)
# First release documented without JetPack (so without DLA on Orin); nothing newer is known
# to bring it back, so DLA is refused from here until a release documents it.
DLA_JETPACK_DROPPED_IN = (11, 5, 0)


def tensorrt_version() -> str | None:
    """Installed TensorRT version, or None. Imports the module: it is the only reliable check."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version string; patch 0 when absent."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if not m:
        raise CalibrationError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH...]")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(frozen=True)
class BuildRequest:
    precision: str
    height: int
    width: int
    onnx_fp32: Path
    onnx_fp16: Path | None = None
    onnx_int8_qdq: Path | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None
    dla_core: int | None = None
    version_compatible: bool = False


@dataclass(frozen=True)
class BuildPlan:
    trt_version: str
    trt_major: int
    precision: str
    onnx: Path
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag member names
    builder_flags: tuple[str, ...]  # BuilderFlag member names
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    workspace_bytes: int
    timing_cache: Path | None
    dla_core: int | None
    strongly_typed: bool
    version_compatible: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx"] = self.onnx.name
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        d["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return d


def _check_dla(version: tuple[int, int, int], trt_version: str, req: BuildRequest) -> None:
    """Refuse DLA builds that TensorRT would run on the GPU instead, or not build at all."""
    if req.dla_core is None:
        return
    if req.dla_core < 0:
        raise CalibrationError(f"--dla-core must be >= 0, got {req.dla_core}")
    if req.precision == "fp32":
        raise CalibrationError("DLA runs FP16 or INT8 only: add --fp16 or --int8 to use --dla-core")
    if not req.min_batch == req.opt_batch == req.max_batch:
        raise CalibrationError(
            f"--dla-core needs one batch size (min = opt = max), got "
            f"{req.min_batch}/{req.opt_batch}/{req.max_batch}"
        )
    major = version[0]
    if major == 8 and req.precision == "int8":
        raise CalibrationError(
            f"TensorRT {trt_version}: DLA does not take Q/DQ (explicitly quantized) networks; "
            "use --fp16 with --dla-core, or build INT8 for the GPU without --dla-core"
        )
    if major >= 10 and version < DLA_STRONGLY_TYPED_FROM:
        raise CalibrationError(
            f"TensorRT {trt_version}: this build is a strongly typed network, which DLA runs only from "
            "TensorRT 11.4.1 (JetPack 7.2.2); drop --dla-core to build for the GPU"
        )
    if version >= DLA_JETPACK_DROPPED_IN:
        raise CalibrationError(
            f"TensorRT {trt_version} does not support JetPack, so it has no DLA on Jetson Orin; "
            "use TensorRT 11.4.1 on JetPack 7.2.2 or later for DLA, or drop --dla-core to build for the GPU"
        )


def plan_build(trt_version: str, req: BuildRequest) -> BuildPlan:
    """Everything the executor does, decided from the TensorRT version and the request."""
    version = parse_version(trt_version)
    major = version[0]
    if version[:2] < MIN_TENSORRT:
        raise CalibrationError(
            f"TensorRT {trt_version} is too old: {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer is required "
            "(JetPack 5.1 ships 8.5: use JetPack 6 or newer, or the .onnx model with ONNX Runtime)"
        )
    if req.precision not in PRECISIONS:
        raise CalibrationError(f"precision {req.precision!r} is unknown, expected one of {PRECISIONS}")
    if not 1 <= req.min_batch <= req.opt_batch <= req.max_batch:
        raise CalibrationError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got {req.min_batch}/{req.opt_batch}/{req.max_batch}"
        )
    if req.workspace_mb <= 0:
        raise CalibrationError(f"--workspace-mb must be positive, got {req.workspace_mb}")
    _check_dla(version, trt_version, req)
    notes: list[str] = []
    network_flags: list[str] = []
    builder_flags: list[str] = []
    onnx = req.onnx_fp32
    strongly_typed = major >= 10
    if major == 8:
        network_flags.append("EXPLICIT_BATCH")
        if req.precision == "fp16":
            builder_flags.append("FP16")
        elif req.precision == "int8":
            if req.onnx_int8_qdq is None:
                raise CalibrationError(
                    f"TensorRT {trt_version}: INT8 needs the Q/DQ model (.int8.trt.onnx); implicit "
                    "calibration is not supported here"
                )
            builder_flags += ["INT8", "FP16"]
            onnx = req.onnx_int8_qdq
    else:
        if major == 10:
            network_flags.append("STRONGLY_TYPED")
        if req.precision == "fp16":
            if req.onnx_fp16 is None:
                raise CalibrationError(
                    f"TensorRT {trt_version}: FP16 needs the FP16 ONNX (strongly typed network); none was given"
                )
            onnx = req.onnx_fp16
        elif req.precision == "int8":
            if req.onnx_int8_qdq is None:
                raise CalibrationError(
                    f"TensorRT {trt_version}: INT8 needs the Q/DQ model (.int8.trt.onnx); implicit calibration "
                    "is deprecated in 10.1 and removed in 11"
                )
            onnx = req.onnx_int8_qdq
    if req.dla_core is not None:
        # Single layers DLA cannot run (e.g. the score pooling) go to the GPU.
        builder_flags.append("GPU_FALLBACK")
    if req.version_compatible:
        builder_flags.append("VERSION_COMPATIBLE")
        notes.append("version-compatible plan: runs on later TensorRT runtimes, possibly slower")
    c, h, w = 3, req.height, req.width
    profile = {
        INPUT_NAME: ((req.min_batch, c, h, w), (req.opt_batch, c, h, w), (req.max_batch, c, h, w)),
    }
    return BuildPlan(
        trt_version=trt_version,
        trt_major=major,
        precision=req.precision,
        onnx=onnx,
        network_flags=tuple(network_flags),
        builder_flags=tuple(builder_flags),
        profile=profile,
        workspace_bytes=req.workspace_mb * 1024 * 1024,
        timing_cache=req.timing_cache,
        dla_core=req.dla_core,
        strongly_typed=strongly_typed,
        version_compatible=req.version_compatible,
        notes=tuple(notes),
    )


def trtexec_command(plan: BuildPlan, output: str | os.PathLike[str]) -> str:
    """The trtexec command line that builds the same plan (flags as in trtexec --help)."""

    def dims(shape: tuple[int, ...]) -> str:
        return "x".join(str(d) for d in shape)

    args = ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={output}"]
    if "STRONGLY_TYPED" in plan.network_flags:
        args.append("--stronglyTyped")
    args += [f"--{f.lower()}" for f in plan.builder_flags if f in ("FP16", "INT8")]
    for i, key in enumerate(("minShapes", "optShapes", "maxShapes")):
        args.append(f"--{key}=" + ",".join(f"{n}:{dims(s[i])}" for n, s in plan.profile.items()))
    args.append(f"--memPoolSize=workspace:{plan.workspace_bytes // (1024 * 1024)}")  # MiB
    if plan.timing_cache is not None:
        args.append(f"--timingCacheFile={plan.timing_cache}")
    if plan.dla_core is not None:
        args.append(f"--useDLACore={plan.dla_core}")
    if "GPU_FALLBACK" in plan.builder_flags:
        args.append("--allowGPUFallback")
    if plan.version_compatible:
        args.append("--versionCompatible")
    args.append("--profilingVerbosity=detailed")
    return shlex.join(args)


# -- executor (needs TensorRT and a GPU) ------------------------------------------------


@dataclass
class EngineBuildResult:
    path: Path
    plan: BuildPlan
    layer_precisions: dict[str, str]
    precision_counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def _builder(trt: Any, logger: Any) -> Any:
    try:
        return trt.Builder(logger)
    except TypeError as exc:  # pybind11 "factory function returned nullptr": no usable GPU
        raise CalibrationError(
            f"TensorRT {trt.__version__} cannot create a builder: no usable CUDA GPU or driver ({exc}); "
            "run 'pouta-edge doctor' on this machine"
        ) from None


def _load_timing_cache(trt_config: Any, path: Path | None, log: Callable[[str], None]) -> None:
    """Attach the cache at ``path``; a corrupt or foreign one is replaced by a fresh one."""
    if path is None:
        return
    blob = b""
    if path.is_file():
        blob = path.read_bytes()
    cache = None
    try:
        cache = trt_config.create_timing_cache(blob)
    except Exception as exc:  # the binding raises on some malformed blobs
        log(f"warning: timing cache {path} is unreadable ({exc}); starting a fresh one")
    if cache is None and blob:
        log(f"warning: timing cache {path} is corrupt; starting a fresh one")
    if cache is not None and trt_config.set_timing_cache(cache, False):
        return
    if cache is not None:
        log(
            f"warning: timing cache {path} was made by another GPU or TensorRT version and was refused; "
            "starting a fresh one"
        )
    fresh = trt_config.create_timing_cache(b"")
    if fresh is None or not trt_config.set_timing_cache(fresh, False):
        log("warning: TensorRT refused an empty timing cache; building without one")


def _save_timing_cache(trt_config: Any, path: Path, log: Callable[[str], None]) -> None:
    from pouta.edge.contract.fsutil import atomic_write_bytes

    try:
        cache = trt_config.get_timing_cache()
        data = cache.serialize() if cache is not None else None
        if data is None:
            log(f"warning: TensorRT returned no timing cache; {path} not written")
            return
        atomic_write_bytes(path, bytes(data), fsync=False)
    except (OSError, RuntimeError, TypeError) as exc:
        log(f"warning: timing cache {path} not written ({exc})")


def build_engine(
    plan: BuildPlan, output: str | os.PathLike[str], log: Callable[[str], None] = print
) -> EngineBuildResult:
    """Run ``plan`` with the installed TensorRT and write the serialized plan to ``output``."""
    import tensorrt as trt
    from pouta.edge.contract.fsutil import atomic_write_bytes

    logger = trt.Logger(trt.Logger.WARNING)
    builder = _builder(trt, logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CalibrationError(f"{plan.onnx}: TensorRT cannot parse the ONNX model ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    # DETAILED so the inspector reports per-layer types: the only proof FP16/INT8 took effect.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    profile = builder.create_optimization_profile()
    for tensor, (mn, opt, mx) in plan.profile.items():
        profile.set_shape(tensor, mn, opt, mx)
    config.add_optimization_profile(profile)
    _load_timing_cache(config, plan.timing_cache, log)
    log(f"building TensorRT {plan.trt_version} {plan.precision} engine from {plan.onnx.name} (minutes) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CalibrationError(f"{plan.onnx}: TensorRT engine build failed (see the TensorRT log above)")
    # The plan first: it took minutes; nothing after this may lose it.
    out = atomic_write_bytes(output, bytes(serialized))
    if plan.timing_cache is not None:
        _save_timing_cache(config, plan.timing_cache, log)
    runtime = trt.Runtime(logger)
    if plan.version_compatible:
        runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    if engine is None:
        raise CalibrationError(
            f"{out}: written, but this TensorRT cannot load it back to check its layer precisions "
            "(see the TensorRT log above)"
        )
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    precisions = layer_precisions(info)
    counts, warnings = check_precisions(precisions, plan.precision, plan.trt_major, fused_layer_names(info))
    for w in warnings:
        log(f"warning: {out.name}: {w}")
    return EngineBuildResult(out, plan, precisions, counts, warnings)
