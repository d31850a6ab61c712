"""TensorRT plan building: a pure-python ``BuildPlan`` plus a thin executor.

What differs between TensorRT versions is decided in ``plan_build`` from the version
string alone, so it is unit-tested without TensorRT or a GPU:

- 8.6 (JetPack 5 / 6.0): networks need the EXPLICIT_BATCH creation flag; precision
  comes from builder flags. INT8 parses the Q/DQ model with INT8 and FP16 set together
  (FP16 for the layers left unquantized). Implicit calibration is only a fallback
  when no Q/DQ model exists.
- 10.x (JetPack 6.1/6.2 ships 10.3): EXPLICIT_BATCH is deprecated and ignored; the
  network is created STRONGLY_TYPED so tensor types come from the ONNX file (FP16 ONNX
  or Q/DQ ONNX) and precision flags are neither needed nor allowed.
- 11.x: BuilderFlag.FP16/INT8 and the int8 calibrator are removed and every network is
  strongly typed (the STRONGLY_TYPED flag is deprecated and ignored), so FP16 needs the
  FP16 ONNX and INT8 needs the ``.int8.trt.onnx``.

Sources: TensorRT Python API (Builder, IBuilderConfig, EngineInspector, ITimingCache) and
"Migrating from TensorRT 10.x to 11.x" (removed Python APIs, IEngineInspector JSON), on
docs.nvidia.com/deeplearning/tensorrt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pouta.edge.metadata import INPUT_NAME

from .errors import CalibrationError

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 1024


def tensorrt_version() -> str | None:
    """Installed TensorRT version, or None. Imports the module: it is the only reliable check."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)\.(\d+)", version.strip())
    if not m:
        raise CalibrationError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[...]")
    return int(m.group(1)), int(m.group(2))


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
    use_int8_calibrator: bool
    strongly_typed: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx"] = self.onnx.name
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        d["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return d


def plan_build(trt_version: str, req: BuildRequest) -> BuildPlan:
    """Everything the executor does, decided from the TensorRT version and the request."""
    major, minor = parse_version(trt_version)
    if (major, minor) < (8, 6):
        raise CalibrationError(f"TensorRT {trt_version} is too old: 8.6 or newer is required")
    if req.precision not in PRECISIONS:
        raise CalibrationError(f"precision {req.precision!r} is unknown, expected one of {PRECISIONS}")
    if not 1 <= req.min_batch <= req.opt_batch <= req.max_batch:
        raise CalibrationError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got {req.min_batch}/{req.opt_batch}/{req.max_batch}"
        )
    if req.workspace_mb <= 0:
        raise CalibrationError(f"--workspace-mb must be positive, got {req.workspace_mb}")
    notes: list[str] = []
    network_flags: list[str] = []
    builder_flags: list[str] = []
    use_calibrator = False
    onnx = req.onnx_fp32
    strongly_typed = major >= 10
    if major == 8:
        network_flags.append("EXPLICIT_BATCH")
        if req.precision == "fp16":
            builder_flags.append("FP16")
        elif req.precision == "int8":
            builder_flags += ["INT8", "FP16"]
            if req.onnx_int8_qdq is not None:
                onnx = req.onnx_int8_qdq
            else:
                use_calibrator = True
                notes.append("no Q/DQ model: falling back to implicit INT8 with the entropy calibrator")
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
        if req.dla_core < 0:
            raise CalibrationError(f"--dla-core must be >= 0, got {req.dla_core}")
        if req.precision == "fp32":
            raise CalibrationError("DLA runs FP16 or INT8 only: add --fp16 or --int8 to use --dla-core")
        # Layers DLA cannot run (e.g. the score pooling) go to the GPU instead of failing.
        builder_flags.append("GPU_FALLBACK")
        if major >= 11:
            notes.append("TensorRT 11 documents DLA as unsupported on JetPack; the build may fail")
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
        use_int8_calibrator=use_calibrator,
        strongly_typed=strongly_typed,
        notes=tuple(notes),
    )


# -- engine inspection (pure python: parses the inspector's JSON) ---------------------

_PRECISION_PATTERNS = (
    ("int8", re.compile(r"\bint8\b", re.IGNORECASE)),
    ("fp16", re.compile(r"\b(fp16|half)\b", re.IGNORECASE)),
    ("fp32", re.compile(r"\b(fp32|float)\b", re.IGNORECASE)),
)


def _tensor_precision(desc: dict[str, Any]) -> str | None:
    # 10.x: "Format/Datatype": "Row major linear FP16 format"; 11.x splits it into
    # "Format" and "DataType" ("Half", "Float", "Int8").
    text = " ".join(str(desc.get(k, "")) for k in ("Format/Datatype", "DataType", "Format"))
    for name, pattern in _PRECISION_PATTERNS:
        if pattern.search(text):
            return name
    return None


def layer_precisions(engine_info_json: str) -> dict[str, str]:
    """Layer name -> precision of its output (or 'unknown') from DETAILED inspector JSON."""
    try:
        info = json.loads(engine_info_json)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"engine inspector returned invalid JSON ({exc})") from None
    out: dict[str, str] = {}
    for i, layer in enumerate(info.get("Layers", [])):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity: names without detail
            out[layer] = "unknown"
            continue
        name = str(layer.get("Name", f"layer_{i}"))
        precs = [p for p in (_tensor_precision(t) for t in layer.get("Outputs", [])) if p]
        # A layer computing in int8 may emit a higher-precision output (dequantizing
        # epilogue); report the lowest precision among its inputs and outputs.
        precs += [p for p in (_tensor_precision(t) for t in layer.get("Inputs", [])) if p]
        order = {"int8": 0, "fp16": 1, "fp32": 2}
        out[name] = min(precs, key=order.__getitem__) if precs else "unknown"
    return out


def check_precisions(precisions: dict[str, str], wanted: str) -> dict[str, int]:
    """Counts per precision; raises when FP16/INT8 was asked for and nothing runs in it."""
    counts: dict[str, int] = {}
    for p in precisions.values():
        counts[p] = counts.get(p, 0) + 1
    if wanted in ("fp16", "int8"):
        reduced = counts.get("fp16", 0) + counts.get("int8", 0)
        if precisions and reduced == 0:
            raise CalibrationError(
                f"asked for {wanted.upper()} but every engine layer runs in FP32 ({counts}); "
                "the GPU or the ONNX types do not allow reduced precision"
            )
        if wanted == "int8" and counts.get("int8", 0) == 0:
            raise CalibrationError(f"asked for INT8 but no engine layer runs in INT8 ({counts})")
    return counts


# -- executor (needs TensorRT and a GPU) ------------------------------------------------


@dataclass
class EngineBuildResult:
    path: Path
    plan: BuildPlan
    layer_precisions: dict[str, str]
    precision_counts: dict[str, int]


def build_engine(
    plan: BuildPlan, output: str | os.PathLike[str], log: Callable[[str], None] = print
) -> EngineBuildResult:
    """Run ``plan`` with the installed TensorRT and write the serialized plan to ``output``."""
    import tensorrt as trt
    from pouta.edge.fsutil import atomic_write_bytes

    if plan.use_int8_calibrator:
        raise CalibrationError(
            "implicit INT8 calibration is not implemented here; build the Q/DQ model (.int8.trt.onnx) first"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
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
    cache_bytes = plan.timing_cache.read_bytes() if plan.timing_cache and plan.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # a cache from another GPU/version is refused
    log(f"building TensorRT {plan.trt_version} {plan.precision} engine from {plan.onnx.name} (minutes) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CalibrationError(f"{plan.onnx}: TensorRT engine build failed (see the TensorRT log above)")
    if plan.timing_cache is not None:
        atomic_write_bytes(plan.timing_cache, bytes(config.get_timing_cache().serialize()), fsync=False)
    out = atomic_write_bytes(output, bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    inspector = engine.create_engine_inspector()
    precisions = layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    counts = check_precisions(precisions, plan.precision)
    return EngineBuildResult(out, plan, precisions, counts)
