"""Device memory for the TensorRT backend through one small adapter.

Two implementations, chosen by what imports: cuda-python's ``cuda.bindings.runtime``
(what NVIDIA's TensorRT samples use; wheels for x86-64 and aarch64; older releases ship it
as ``cuda.cudart``) and pycuda (source-only, needs a CUDA toolkit to build). Both expose
page-locked host arrays, device allocations, async copies on one stream, and a sync.
Nothing here is imported unless a TensorRT plan is run.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .errors import PoutaError


class CudaError(PoutaError):
    """A CUDA runtime call failed, or no CUDA Python binding is installed."""


class CudaMemory(Protocol):
    name: str

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...

    def device_alloc(self, nbytes: int) -> int: ...

    def device_free(self, ptr: int) -> None: ...

    def htod_async(self, dst: int, src: np.ndarray) -> None: ...

    def dtoh_async(self, dst: np.ndarray, src: int) -> None: ...

    @property
    def stream_handle(self) -> int: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


def _check(result: Any, what: str) -> Any:
    # cuda-python returns (cudaError_t, value...) tuples instead of raising.
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"CUDA {what} failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class CudaPythonMemory:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6 layout
        self.rt = cudart
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._host: list[int] = []

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dt.itemsize)
        ptr = _check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost")
        self._host.append(int(ptr))
        import ctypes

        buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
        return np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(shape)

    def device_alloc(self, nbytes: int) -> int:
        return int(_check(self.rt.cudaMalloc(max(1, nbytes)), "cudaMalloc"))

    def device_free(self, ptr: int) -> None:
        _check(self.rt.cudaFree(ptr), "cudaFree")

    def htod_async(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(
            self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream), "cudaMemcpyAsync"
        )

    def dtoh_async(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(
            self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream), "cudaMemcpyAsync"
        )

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._host:
            self.rt.cudaFreeHost(ptr)
        self._host.clear()
        self.rt.cudaStreamDestroy(self.stream)


class PyCudaMemory:
    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401 - creates the CUDA context on device 0
        import pycuda.driver as cuda

        self.cuda = cuda
        self.stream = cuda.Stream()
        self._dev: dict[int, Any] = {}

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.cuda.pagelocked_empty(shape, np.dtype(dtype))

    def device_alloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(max(1, nbytes))
        self._dev[int(alloc)] = alloc  # keep the DeviceAllocation alive: it frees on GC
        return int(alloc)

    def device_free(self, ptr: int) -> None:
        alloc = self._dev.pop(ptr, None)
        if alloc is not None:
            alloc.free()

    def htod_async(self, dst: int, src: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dst, src, self.stream)

    def dtoh_async(self, dst: np.ndarray, src: int) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, self.stream)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for ptr in list(self._dev):
            self.device_free(ptr)


def available_implementations() -> list[str]:
    import importlib.util

    out = []
    if importlib.util.find_spec("cuda") is not None:
        out.append("cuda-python")
    if importlib.util.find_spec("pycuda") is not None:
        out.append("pycuda")
    return out


def open_cuda_memory(prefer: str | None = None) -> CudaMemory:
    """The first implementation that imports (``prefer`` first when given)."""
    order = ["cuda-python", "pycuda"]
    if prefer in order:
        order.remove(prefer)
        order.insert(0, prefer)
    errors = []
    for name in order:
        try:
            return CudaPythonMemory() if name == "cuda-python" else PyCudaMemory()
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise CudaError(
        "TensorRT plans need CUDA device memory: pip install cuda-python (or pycuda); " + "; ".join(errors)
    )
