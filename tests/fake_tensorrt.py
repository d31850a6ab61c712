"""A fake ``tensorrt`` module for contract tests, written from TensorRT's documented API.

What it enforces (TensorRT Python API reference for 8.6, 10.x and 11.x, the migration
guides, trtexec's reference, Polygraphy's loader, NVIDIA's sampleEngines.cpp):

- ``trt.Builder(logger)`` and ``trt.Runtime(logger)`` raise ``TypeError: pybind11::init():
  factory function returned nullptr`` when no CUDA device is usable.
- Enums differ per version: 8.6 has EXPLICIT_BATCH and no STRONGLY_TYPED; 11 has no
  BuilderFlag.FP16/INT8. The ONNX parser of 8.x needs an explicit-batch network.
  Strongly typed networks refuse precision flags (the build returns None).
- ``deserialize_cuda_engine`` returns None (and logs) for a plan from another TensorRT
  version or another GPU architecture (compute capability), and for a version-compatible
  plan unless the runtime set ``engine_host_code_allowed = True`` first. A plan from another
  device *model* of the same compute capability loads with a warning ("Using an engine plan
  file across different models of devices is not recommended and is likely to affect
  performance or even cause errors."). Sources: Support Matrix, "Engine Portability"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/getting-started/support-matrix.html:
  "Without this mode, engines are not portable across different GPU architectures"); the
  warning and the "expecting compute X got compute Y, please rebuild" error as TensorRT logs
  them in NVIDIA/TensorRT issues #2900, #3829 and #564.
- Engine inspector (EngineInspector, Python API,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/EngineInspector.html):
  what it prints depends on the builder config's ``profiling_verbosity`` at build time.
  The default LAYER_NAMES_ONLY prints layer names only (the "Layers" list holds strings),
  DETAILED adds layer parameters (the tensor formats/types that show the precision), NONE
  prints no layer information. 10.x lists the I/O tensor names under "Bindings"; 11.x
  replaced it with "I/O Tensors", a list of objects ("Migrating IEngineInspector Usage from
  TensorRT 10.x to 11.x", https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html).
- DLA ("Working with DLA" of each release, e.g.
  https://docs.nvidia.com/deeplearning/tensorrt/11.5.0/inference-library/work-with-dla.html):
  10.7 is the last 10.x release with DLA; 11.0 through 11.4.0 have no DLA on Linux/JetPack;
  11.4.1 has DLA on Jetson AGX Orin (JetPack 7.2.2+); 11.5.0 does not support JetPack, so a
  DLA build fails there. A DLA build asks for a core the device has.
- Timing caches: ``create_timing_cache`` of a malformed blob returns None;
  ``set_timing_cache(cache, ignore_mismatch=False)`` returns False for a cache from another
  device or version and leaves none attached, so ``get_timing_cache()`` is None.
- On 8.6 the FP16 flag only allows FP16: ``FakeTrtOptions.fp16_choice`` says what the
  tactic selection chose. ``fuse_into_myelin`` reports one Myelin layer.
- Execution: ``set_input_shape`` returns False outside the optimization profile;
  ``execute_async_v3`` runs in the calling thread's runtime context (the primary one when
  none is current) and returns False when the stream or a tensor address belongs to
  another context. The engine computes with ONNX Runtime on the ONNX it was built from,
  so outputs are real.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from fake_cuda import CudaFault, FakeGpu

MAGIC = b"FAKETRTPLAN\0"
CACHE_MAGIC = b"FAKETRTCACHE\0"


@dataclass
class FakeTrtOptions:
    version: str = "10.3.0"
    fp16_choice: str = "fp16"  # 8.6 with the FP16 flag: what the tactic selection picked
    fuse_into_myelin: bool = False
    log: list[str] = field(default_factory=list)
    cache_hits: list[int] = field(default_factory=list)  # timing-cache entries reused per build


def _enum(name: str, members: list[str]) -> type[enum.IntEnum]:
    return enum.IntEnum(name, {m: i for i, m in enumerate(members)})  # type: ignore[return-value]


def make_tensorrt(gpu: FakeGpu, opts: FakeTrtOptions) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = opts.version
    major = int(opts.version.split(".")[0])

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    def log(msg: str) -> None:
        opts.log.append(msg)

    def require_gpu() -> None:
        if not gpu.present:
            raise TypeError("pybind11::init(): factory function returned nullptr")

    net_flags = {8: ["EXPLICIT_BATCH", "EXPLICIT_PRECISION"], 10: ["EXPLICIT_BATCH", "STRONGLY_TYPED"]}
    NetworkDefinitionCreationFlag = _enum(
        "NetworkDefinitionCreationFlag", net_flags.get(major, ["STRONGLY_TYPED"])
    )
    builder_flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "VERSION_COMPATIBLE"]
    if major < 11:
        builder_flags = ["FP16", "INT8", *builder_flags]
    BuilderFlag = _enum("BuilderFlag", builder_flags)
    MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM"])
    ProfilingVerbosity = _enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"])
    LayerInformationFormat = _enum("LayerInformationFormat", ["ONELINE", "JSON"])
    DeviceType = _enum("DeviceType", ["GPU", "DLA"])
    TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    DataType = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "INT64"])

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def __str__(self) -> str:
            return self.text

    class Network:
        def __init__(self, flags: int) -> None:
            known = sum(1 << int(m) for m in NetworkDefinitionCreationFlag)
            if flags & ~known:
                raise ValueError(f"unknown network creation flags {flags:#x}")
            names = {m.name for m in NetworkDefinitionCreationFlag if flags & (1 << int(m))}
            self.explicit_batch = major >= 10 or "EXPLICIT_BATCH" in names
            self.strongly_typed = major >= 11 or "STRONGLY_TYPED" in names
            self.onnx: bytes | None = None

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            if not self.network.explicit_batch:
                self.errors.append(ParserError("ModelImporter: network must have explicit batch dimension"))
                return False
            try:
                onnx.checker.check_model(onnx.load(path))
            except Exception as exc:
                self.errors.append(ParserError(f"{path}: {exc}"))
                return False
            self.network.onnx = Path(path).read_bytes()
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class HostMemory(bytes):
        pass

    class TimingCache:
        def __init__(self, device: str, version: str, entries: list[str]) -> None:
            self.device, self.version, self.entries = device, version, list(entries)

        def serialize(self) -> HostMemory:
            body = json.dumps({"device": self.device, "version": self.version, "entries": self.entries})
            return HostMemory(CACHE_MAGIC + body.encode())

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.profiles: list[Profile] = []
            self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1
            self.cache: TimingCache | None = None
            self.pool: dict[Any, int] = {}

        def set_memory_pool_limit(self, pool: Any, nbytes: int) -> None:
            self.pool[pool] = int(nbytes)

        def set_flag(self, flag: Any) -> None:
            self.flags.add(BuilderFlag(flag).name)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: bytes) -> TimingCache | None:
            if not blob:
                return TimingCache(gpu.name, opts.version, [])
            if not bytes(blob).startswith(CACHE_MAGIC):
                log("[E] ITimingCache: cache blob is corrupted")
                return None
            try:
                d = json.loads(bytes(blob)[len(CACHE_MAGIC) :])
                return TimingCache(str(d["device"]), str(d["version"]), list(d["entries"]))
            except (ValueError, KeyError):
                log("[E] ITimingCache: cache blob is corrupted")
                return None

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if not ignore_mismatch and (cache.device, cache.version) != (gpu.name, opts.version):
                log("[E] timing cache header mismatch (device or TensorRT version)")
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            require_gpu()

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> HostMemory | None:
            if network.onnx is None:
                log("[E] network has no layers")
                return None
            if network.strongly_typed and config.flags & {"FP16", "INT8"}:
                log("[E] precision flags are not allowed for strongly typed networks")
                return None
            if config.default_device_type == DeviceType.DLA:
                if not _dla_supported(opts.version):
                    log(f"[E] DLA is not supported by TensorRT {opts.version} on this platform")
                    return None
                if not 0 <= config.DLA_core < gpu.dla_cores:
                    log(f"[E] DLA core {config.DLA_core} is not available ({gpu.dla_cores} cores)")
                    return None
            if len(config.profiles) != 1 or "image" not in config.profiles[0].shapes:
                log("[E] network has dynamic inputs but no optimization profile")
                return None
            model = onnx.load_from_string(network.onnx)
            layers = _layers(model, network.strongly_typed, config.flags, opts)
            key = hashlib.sha256(network.onnx).hexdigest()[:16]
            if config.cache is not None:
                opts.cache_hits.append(config.cache.entries.count(key))
                if key not in config.cache.entries:
                    config.cache.entries.append(key)
            header = {
                "version": opts.version,
                "device": gpu.name,
                "compute_capability": list(gpu.compute_capability),
                "profiling_verbosity": ProfilingVerbosity(config.profiling_verbosity).name,
                "version_compatible": "VERSION_COMPATIBLE" in config.flags,
                "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()},
                "layers": layers,
                "onnx": base64.b64encode(network.onnx).decode(),
            }
            return HostMemory(MAGIC + json.dumps(header).encode())

    class Inspector:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine

        def get_engine_information(self, fmt: Any) -> str:
            verbosity = self.engine.header["profiling_verbosity"]
            layers: list[Any] = self.engine.header["layers"]
            if verbosity == "LAYER_NAMES_ONLY":
                layers = [lay["Name"] for lay in layers]
            elif verbosity == "NONE":
                layers = []
            if major >= 11:
                io: list[Any] = [
                    {
                        "Name": name,
                        "IOMode": "Input" if is_input else "Output",
                        "DataType": "Float",
                        "Dimensions": list(shape),
                        "Location": "Device",
                        "IsShapeInferenceIO": False,
                    }
                    for name, (shape, is_input) in self.engine.io.items()
                ]
                return json.dumps({"Layers": layers, "I/O Tensors": io})
            return json.dumps({"Layers": layers, "Bindings": list(self.engine.io)})

    class Engine:
        def __init__(self, header: dict[str, Any]) -> None:
            import onnxruntime as ort

            self.header = header
            model = base64.b64decode(header["onnx"])
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            io: dict[str, tuple[tuple[int, ...], bool]] = {}
            for t in self.session.get_inputs():
                io[t.name] = (tuple(-1 if not isinstance(d, int) else d for d in t.shape), True)
            for t in self.session.get_outputs():
                io[t.name] = (tuple(-1 if not isinstance(d, int) else d for d in t.shape), False)
            self.io = io
            self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["profile"].items()}

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return list(self.io)[i]

        def get_tensor_mode(self, name: str) -> Any:
            return TensorIOMode.INPUT if self.io[name][1] else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.io[name][0]

        def get_tensor_dtype(self, name: str) -> Any:
            return DataType.FLOAT

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> tuple[tuple[int, ...], ...]:
            return self.profile[name]

        def create_execution_context(self) -> ExecutionContext:
            return ExecutionContext(self)

        def create_engine_inspector(self) -> Inspector:
            return Inspector(self)

    class ExecutionContext:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            mn, _opt, mx = self.engine.profile[name]
            if len(shape) != len(mn) or any(
                not lo <= d <= hi for d, lo, hi in zip(shape, mn, mx, strict=True)
            ):
                log(f"[E] IExecutionContext::setInputShape: {name} {shape} is outside the profile")
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            if name not in self.engine.io:
                log(f"[E] setTensorAddress: no tensor {name}")
                return False
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            try:
                ctx = gpu.runtime_context()
                gpu.check_stream(int(stream_handle), ctx)
                inputs = {}
                for name, (_shape, is_input) in self.engine.io.items():
                    if name not in self.addresses:
                        log(f"[E] enqueueV3: address of tensor {name} is not set")
                        return False
                    if is_input:
                        if name not in self.shapes:
                            log(f"[E] enqueueV3: input shape of {name} is not specified")
                            return False
                        n = int(np.prod(self.shapes[name])) * 4
                        buf = gpu.device_buffer(self.addresses[name], ctx, n)
                        inputs[name] = buf[:n].view(np.float32).reshape(self.shapes[name]).copy()
                outs = self.engine.session.run(None, inputs)
                for meta, value in zip(self.engine.session.get_outputs(), outs, strict=True):
                    data = np.ascontiguousarray(value, dtype=np.float32)
                    buf = gpu.device_buffer(self.addresses[meta.name], ctx, data.nbytes)
                    buf[: data.nbytes] = data.view(np.uint8).reshape(-1)
            except CudaFault as exc:
                log(f"[E] enqueueV3: CUDA error {exc.code} ({exc.text})")
                return False
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            require_gpu()
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
            blob = bytes(blob)
            if not blob.startswith(MAGIC):
                log("[E] deserializeCudaEngine: magic tag does not match")
                return None
            header = json.loads(blob[len(MAGIC) :])
            if header["version_compatible"]:
                if not self.engine_host_code_allowed:
                    log("[E] cannot deserialize a plan with host code: engine_host_code_allowed is False")
                    return None
                if int(header["version"].split(".")[0]) != major:
                    log("[E] version-compatible plan from another major version")
                    return None
            elif header["version"] != opts.version:
                log(
                    "[E] The engine plan file is not compatible with this version of TensorRT, expecting "
                    f"library version {opts.version} got {header['version']}, please rebuild."
                )
                return None
            built_cc, here_cc = tuple(header["compute_capability"]), tuple(gpu.compute_capability)
            if built_cc != here_cc:
                log(
                    "[E] The engine plan file is generated on an incompatible device, expecting compute "
                    f"{here_cc[0]}.{here_cc[1]} got compute {built_cc[0]}.{built_cc[1]}, please rebuild."
                )
                return None
            if header["device"] != gpu.name:
                log(
                    "[W] Using an engine plan file across different models of devices is not recommended "
                    "and is likely to affect performance or even cause errors."
                )
            return Engine(header)

    for obj in (Logger, Builder, Runtime, OnnxParser):
        setattr(trt, obj.__name__, obj)
    for e in (
        NetworkDefinitionCreationFlag,
        BuilderFlag,
        MemoryPoolType,
        ProfilingVerbosity,
        LayerInformationFormat,
        DeviceType,
        TensorIOMode,
        DataType,
    ):
        setattr(trt, e.__name__, e)
    return trt


def _dla_supported(version: str) -> bool:
    """Whether this TensorRT release builds for DLA on Linux/JetPack ("Working with DLA")."""
    v = tuple(int(x) for x in version.split(".")[:3])
    return v < (10, 8, 0) or (11, 4, 1) <= v < (11, 5, 0)


def _layers(model: onnx.ModelProto, strongly_typed: bool, flags: set[str], opts: FakeTrtOptions) -> list[Any]:
    """Inspector-JSON layers: one per compute node, with the precision TensorRT would pick."""
    producers = {o: n for n in model.graph.node for o in n.output}
    fp16_weights = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    v11 = opts.version.startswith("11.")
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant"):
            continue
        quantized = any(
            (p := producers.get(x)) is not None and p.op_type == "DequantizeLinear" for x in node.input[:1]
        )
        if strongly_typed:
            prec = "int8" if quantized else ("fp16" if fp16_weights else "fp32")
        elif "INT8" in flags and quantized:
            prec = "int8"
        elif "FP16" in flags and node.op_type not in ("ReduceMax",):
            prec = opts.fp16_choice
        else:
            prec = "fp32"
        layers.append({"Name": node.name or f"{node.op_type}_{i}", "LayerType": node.op_type, "prec": prec})
    if opts.fuse_into_myelin:
        names = [lay["Name"] for lay in layers]
        layers = [
            {"Name": f"{{ForeignNode[{names[0]}...{names[-1]}]}}", "LayerType": "Myelin", "prec": "fp32"}
        ]
    words = {"fp32": ("FP32", "Float"), "fp16": ("FP16", "Half"), "int8": ("Int8", "Int8")}
    out = []
    for lay in layers:
        fmt10, type11 = words[lay.pop("prec")]
        desc = (
            {"Format": "kLINEAR", "DataType": type11}
            if v11
            else {"Format/Datatype": f"Row major linear {fmt10} format"}
        )
        out.append({**lay, "Inputs": [], "Outputs": [desc]})
    return out


def install_tensorrt(monkeypatch: Any, gpu: FakeGpu, opts: FakeTrtOptions | None = None) -> FakeTrtOptions:
    opts = opts or FakeTrtOptions()
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(gpu, opts))
    return opts


def install_gpu_stack(
    monkeypatch: Any,
    version: str = "10.3.0",
    cuda_major: int = 12,
    pycuda: bool = False,
    cuda_python: bool = True,
    **gpu: Any,
) -> tuple[FakeGpu, FakeTrtOptions]:
    """A fake GPU with tensorrt and the chosen CUDA bindings importable (others blocked)."""
    from fake_cuda import block_module, install_cuda_python, install_pycuda

    dev = FakeGpu(**gpu)
    opts = install_tensorrt(monkeypatch, dev, FakeTrtOptions(version=version))
    if cuda_python:
        install_cuda_python(
            monkeypatch, dev, cuda_major, f"{cuda_major}.9.0" if cuda_major == 12 else "13.0.1"
        )
    else:
        block_module(monkeypatch, "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
    if pycuda:
        install_pycuda(monkeypatch, dev)
    else:
        block_module(monkeypatch, "pycuda", "pycuda.driver", "pycuda.autoinit")
    return dev, opts
