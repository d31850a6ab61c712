"""TensorRT plan backend (TensorRT 8.5+ named-tensor API: works on 8.6, 10 and 11).

Deserialize the plan, check its tensors against the metadata sidecar, set the input
shape, bind one pinned host + one device buffer per I/O tensor with
``set_tensor_address``, and run ``execute_async_v3`` on one CUDA stream. tensorrt and
the CUDA binding are imported only when a plan is opened. Buffer sizing is done by pure
functions below so it is tested without a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.errors import ConfigError, MetadataError
from ..contract.metadata import (
    INPUT_NAME,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_SCORE,
    ModelMetadata,
    check_io,
    load_for_model,
)

# Oldest TensorRT whose plans we build and run (JetPack 6.0 ships 8.6.2; JetPack 5.1's 8.5 is refused).
MIN_TENSORRT = (8, 6)

# TensorRT DataType names -> numpy; plain names so this works without importing tensorrt.
TRT_DTYPES: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name not in TRT_DTYPES:
        raise MetadataError(
            f"TensorRT tensor dtype {name} is not supported, expected one of {sorted(TRT_DTYPES)}"
        )
    return TRT_DTYPES[name]


def resolve_shape(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """Engine shape with the dynamic batch (-1) filled in; other dynamic axes are refused."""
    dims = tuple(int(d) for d in shape)
    if not dims:
        return dims
    out = (batch if dims[0] == -1 else dims[0], *dims[1:])
    if any(d < 0 for d in out[1:]):
        raise MetadataError(
            f"engine tensor shape {list(dims)} has dynamic non-batch axes; rebuild with fixed H/W"
        )
    return out


def buffer_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"shape {list(shape)} is not resolved (negative axis)")
        n *= d
    return n * np.dtype(dtype).itemsize


def plan_buffers(
    tensors: dict[str, tuple[tuple[int, ...], np.dtype, bool]], batch: int
) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """{name: (engine shape, dtype, is_input)} -> {name: (shape at batch, dtype, nbytes)}."""
    out = {}
    for name, (shape, dtype, _is_input) in tensors.items():
        s = resolve_shape(shape, batch)
        out[name] = (s, np.dtype(dtype), buffer_nbytes(s, dtype))
    return out


def check_engine_tensors(
    meta: ModelMetadata, tensors: dict[str, tuple[tuple[int, ...], np.dtype, bool]], source: str
) -> None:
    if INPUT_NAME not in tensors or not tensors[INPUT_NAME][2]:
        raise MetadataError(
            f"{source}: engine has no input tensor '{INPUT_NAME}' (tensors: {sorted(tensors)})"
        )
    outputs = [n for n, (_, _, is_in) in tensors.items() if not is_in]
    check_io(meta, tuple(tensors[INPUT_NAME][0]), outputs, source)
    for name in (INPUT_NAME, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE):
        dt = tensors[name][1]
        if np.dtype(dt) != np.float32:
            raise MetadataError(
                f"{source}: tensor '{name}' is {np.dtype(dt)}, expected float32 I/O (contract)"
            )


def allows_host_code(meta: ModelMetadata) -> bool:
    """Whether the plan's sidecar records a version-compatible build.

    Such a plan embeds the lean runtime (host code); the runtime loads it only after
    ``engine_host_code_allowed = True``, otherwise ``deserialize_cuda_engine`` returns None.
    """
    flags = meta.build.get("builder_flags") or ()
    return bool(meta.build.get("version_compatible")) or "VERSION_COMPATIBLE" in flags


class TensorRTBackend:
    """A TensorRT plan behind the ``Backend`` protocol.

    Opened in one thread, run in another (the pipeline's inference worker): every CUDA
    and TensorRT call runs inside ``mem.activate()`` so pycuda's buffers and TensorRT
    share the device's primary context in whichever thread calls.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: ModelMetadata | None = None,
        max_batch: int = 1,
        cuda: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: engine file not found")
        self.metadata = metadata if metadata is not None else load_for_model(self.path)
        try:
            import tensorrt as trt
        except ImportError:
            raise ConfigError(
                f"{self.path}: TensorRT plans need the tensorrt package (JetPack ships it; "
                "or pip install 'pouta-edge[trt]'); use the .onnx model with ONNX Runtime otherwise"
            ) from None
        from .cuda_memory import open_cuda_memory

        self.trt = trt
        self._batch = 0
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, int] = {}
        self.context: Any = None
        self.engine: Any = None
        self.mem: Any = open_cuda_memory(cuda)
        try:
            with self.mem.activate():
                self._open(trt)
                self._allocate(max_batch)
        except BaseException:
            self.close()
            raise
        self.name = f"tensorrt:{self.mem.name}"

    def _open(self, trt: Any) -> None:
        try:
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        except TypeError as exc:  # pybind11: "factory function returned nullptr"
            raise ConfigError(
                f"{self.path}: TensorRT cannot start a runtime: no usable CUDA GPU ({exc}); "
                "run 'pouta-edge doctor'"
            ) from None
        host_code = allows_host_code(self.metadata)
        if host_code:
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            hint = (
                "the sidecar records a version-compatible build, so the plan is damaged or newer than "
                f"this TensorRT {trt.__version__}"
                if host_code
                else f"built with another TensorRT version than {trt.__version__}, for another GPU, or "
                "version-compatible without the sidecar saying so"
            )
            raise MetadataError(
                f"{self.path}: TensorRT cannot deserialize this plan ({hint}); rebuild it on this device"
            )
        tensors = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            tensors[name] = (
                tuple(self.engine.get_tensor_shape(name)),
                numpy_dtype(self.engine.get_tensor_dtype(name)),
                is_input,
            )
        check_engine_tensors(self.metadata, tensors, str(self.path))
        self.tensors = tensors
        self.context = self.engine.create_execution_context()

    def _allocate(self, batch: int) -> None:
        plan = plan_buffers(self.tensors, batch)
        in_shape = plan[INPUT_NAME][0]
        # Shape first: a rejected batch must leave the current buffers and shape usable.
        if not self.context.set_input_shape(INPUT_NAME, in_shape):
            if self._batch:
                self.context.set_input_shape(
                    INPUT_NAME, plan_buffers(self.tensors, self._batch)[INPUT_NAME][0]
                )
            raise MetadataError(
                f"{self.path}: engine rejects input shape {list(in_shape)} (outside its optimization profile)"
            )
        self._free_buffers()
        for name, (shape, dtype, nbytes) in plan.items():
            self._host[name] = self.mem.pinned_empty(shape, dtype)
            self._dev[name] = self.mem.device_alloc(nbytes)
            if not self.context.set_tensor_address(name, self._dev[name]):
                raise RuntimeError(f"{self.path}: TensorRT refused the address of tensor '{name}'")
        self._batch = batch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int(batch.shape[0])
        with self.mem.activate():
            if n != self._batch:
                self._allocate(n)
            np.copyto(self._host[INPUT_NAME], batch, casting="same_kind")
            self.mem.htod_async(self._dev[INPUT_NAME], self._host[INPUT_NAME])
            if not self.context.execute_async_v3(self.mem.stream_handle):
                raise RuntimeError(f"{self.path}: TensorRT execute_async_v3 failed")
            for name in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE):
                self.mem.dtoh_async(self._host[name], self._dev[name])
            self.mem.synchronize()
        # Copies: the pinned buffers are reused by the next call.
        return self._host[OUTPUT_ANOMALY_MAP].copy(), self._host[OUTPUT_SCORE].reshape(n).copy()

    def _free_buffers(self) -> None:
        for ptr in self._dev.values():
            self.mem.device_free(ptr)
        for array in self._host.values():
            self.mem.pinned_free(array)
        self._dev.clear()
        self._host.clear()

    def close(self) -> None:
        if getattr(self, "mem", None) is None:
            return
        with self.mem.activate():
            self._free_buffers()
            # TensorRT objects go before the CUDA stream and context they were used with.
            self.context = None
            self.engine = None
            self.runtime = None
        self.mem.close()
        self.mem = None
