"""Device memory for the TensorRT backend through one small adapter.

Two implementations, chosen by what imports and works: cuda-python's
``cuda.bindings.runtime`` (what NVIDIA's TensorRT samples use; wheels for x86-64 and
aarch64; older releases ship it as ``cuda.cudart``) and pycuda (source-only, needs a
CUDA toolkit to build). Both expose page-locked host arrays, device allocations, async
copies on one stream, and a sync. Nothing here is imported unless a TensorRT plan is run.

Contexts: TensorRT runs through the CUDA runtime API, which works in the device's
*primary* context in whatever thread calls it. cuda-python's runtime module does the
same, so its buffers and TensorRT's always agree. pycuda works in the context current
to the calling thread only, so ``PyCudaMemory`` retains the primary context and pushes
it around every call (``activate``): the pipeline opens the backend in one thread and
runs it in its inference thread.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from ..contract.errors import PoutaError

IMPLEMENTATIONS = ("cuda-python", "pycuda")
# cudaError_t values (CUDA runtime API, stable across 11.x-13.x).
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100


class CudaError(PoutaError):
    """A CUDA runtime call failed, or no CUDA Python binding is installed."""


class CudaMemory(Protocol):
    name: str

    def activate(self) -> contextlib.AbstractContextManager[None]: ...

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...

    def pinned_free(self, array: np.ndarray) -> None: ...

    def device_alloc(self, nbytes: int) -> int: ...

    def device_free(self, ptr: int) -> None: ...

    def htod_async(self, dst: int, src: np.ndarray) -> None: ...

    def dtoh_async(self, dst: np.ndarray, src: int) -> None: ...

    @property
    def stream_handle(self) -> int: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


def _error_code(err: Any) -> int:
    return int(getattr(err, "value", err))


def _check(result: Any, what: str) -> Any:
    # cuda-python returns (cudaError_t, value...) tuples instead of raising.
    err, *rest = result if isinstance(result, tuple) else (result,)
    code = _error_code(err)
    err = getattr(err, "name", err)  # cudaError_t.cudaErrorInsufficientDriver -> its name
    if code == CUDA_ERROR_INSUFFICIENT_DRIVER:
        raise CudaError(
            f"CUDA {what} failed: {err} (the NVIDIA driver is older than this cuda-python needs: "
            "cuda-python 13 needs driver 580 or newer; on a CUDA 12 driver such as JetPack 6 "
            "install 'cuda-python>=12.6,<13')"
        )
    if code != 0:
        raise CudaError(f"CUDA {what} failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def import_cudart() -> Any:
    """cuda-python's runtime module, in either package layout."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6 layout
    return cudart


class CudaPythonMemory:
    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = import_cudart()
        self.stream = _check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._host: dict[int, int] = {}  # array data address -> cudaMallocHost pointer

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        # The runtime API picks the primary context in any thread: nothing to push.
        yield

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        nbytes = max(1, count * dt.itemsize)
        ptr = int(_check(self.rt.cudaMallocHost(nbytes), "cudaMallocHost"))
        buf = (ctypes.c_byte * nbytes).from_address(ptr)
        array = np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
        self._host[array.ctypes.data] = ptr
        return array

    def pinned_free(self, array: np.ndarray) -> None:
        ptr = self._host.pop(array.ctypes.data, None)
        if ptr is not None:
            _check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

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
        for ptr in self._host.values():
            self.rt.cudaFreeHost(ptr)
        self._host.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class PyCudaMemory:
    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as cuda

        self.cuda = cuda
        try:
            cuda.init()
            self.context = cuda.Device(device).retain_primary_context()
        except cuda.Error as exc:
            raise CudaError(f"pycuda cannot open CUDA device {device}: {exc}") from None
        self._dev: dict[int, Any] = {}
        self._host: dict[int, Any] = {}  # array data address -> HostAllocation
        with self.activate():
            self.stream = cuda.Stream()

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        array = self.cuda.pagelocked_empty(shape, np.dtype(dtype))
        self._host[array.ctypes.data] = array.base
        return array

    def pinned_free(self, array: np.ndarray) -> None:
        alloc = self._host.pop(array.ctypes.data, None)
        if alloc is not None:
            alloc.free()

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
        with self.activate():
            for ptr in list(self._dev):
                self.device_free(ptr)
            for alloc in self._host.values():
                alloc.free()
            self._host.clear()
            self.stream = None
        self.context.detach()  # releases the retained primary context


def open_implementation(name: str) -> CudaMemory:
    """One named implementation; ImportError or CudaError when it cannot work here."""
    return CudaPythonMemory() if name == "cuda-python" else PyCudaMemory()


def open_cuda_memory(prefer: str | None = None) -> CudaMemory:
    """The first implementation that imports and opens (``prefer`` first when given).

    A binding that imports but cannot work here (cuda-python 13 on a CUDA 12 driver
    answers cudaErrorInsufficientDriver) falls through to the next one.
    """
    if prefer is not None and prefer not in IMPLEMENTATIONS:
        raise CudaError(f"cuda: {prefer!r} is unknown, expected one of {IMPLEMENTATIONS}")
    order = list(IMPLEMENTATIONS)
    if prefer is not None:
        order.remove(prefer)
        order.insert(0, prefer)
    errors = []
    for name in order:
        try:
            return open_implementation(name)
        except ImportError as exc:
            errors.append(f"{name}: not installed ({exc})")
        except CudaError as exc:
            errors.append(f"{name}: {exc}")
    raise CudaError(
        "TensorRT plans need CUDA device memory through cuda-python (pip install "
        "'cuda-python>=12.6,<13' for a CUDA 12 driver, 'cuda-python>=13,<14' for driver 580+) "
        "or pycuda; " + "; ".join(errors)
    )
