"""A fake CUDA device behind fake cuda-python and pycuda modules, for contract tests.

Written from the documented behaviour of the real libraries, not from pouta's code:

- CUDA driver: contexts are current *per host thread* (a stack per thread, cuCtxPushCurrent
  / cuCtxPopCurrent). Memory and streams belong to the context they were made in; using a
  stream from another context is ``invalid resource handle``.
- CUDA runtime API (what cuda-python's ``cuda.bindings.runtime`` and TensorRT use): in a
  thread with no current context it makes the device's *primary* context current. A
  binding built for a newer CUDA than the driver answers ``cudaErrorInsufficientDriver``
  (35) to every call that needs the device; without a GPU, ``cudaErrorNoDevice`` (100).
- cuda-python returns ``(cudaError_t, value...)`` tuples and never raises; pointers are
  ints, streams are ``cudaStream_t`` objects that convert with ``int()``.
- pycuda raises ``pycuda.driver.LogicError`` ("... failed: invalid device context") when
  the calling thread has no current context; ``import pycuda.autoinit`` creates a new
  (non-primary) context and makes it current in the importing thread only;
  ``Device.retain_primary_context()`` returns the primary context without pushing it;
  ``pagelocked_empty`` returns an array whose ``.base`` is a ``HostAllocation``.

Memory is real: device buffers are numpy byte arrays and host ("pinned") buffers are
ctypes blocks, so copies move data and an engine can compute on it.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.abc
import importlib.machinery
import itertools
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CudaFault(Exception):
    """A fake driver error: (cudaError_t value, CUDA error string)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


INVALID_VALUE = (1, "invalid argument")
INVALID_CONTEXT = (201, "invalid device context")
INVALID_HANDLE = (400, "invalid resource handle")
NO_DEVICE = (100, "no CUDA-capable device is detected")
INSUFFICIENT_DRIVER = (35, "CUDA driver version is insufficient for CUDA runtime version")


@dataclass(eq=False)
class Context:
    gpu: FakeGpu
    primary: bool
    alive: bool = True


@dataclass
class FakeGpu:
    """One device and its driver. ``present=False`` is a machine without a usable GPU."""

    present: bool = True
    driver_version: int = 12060  # CUDA_VERSION style: 12.6
    name: str = "Fake Orin"
    compute_capability: tuple[int, int] = (8, 7)
    dla_cores: int = 0
    device_mem: dict[int, tuple[np.ndarray, Context]] = field(default_factory=dict)
    host_mem: dict[int, Any] = field(default_factory=dict)
    streams: dict[int, Context] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.primary = Context(self, primary=True)
        self._tls = threading.local()
        self._ids = itertools.count(0x7F0000001000, 0x1000)
        self.lock = threading.Lock()

    # -- contexts -------------------------------------------------------------
    def stack(self) -> list[Context]:
        if not hasattr(self._tls, "stack"):
            self._tls.stack = []
        return self._tls.stack

    def current(self) -> Context | None:
        s = self.stack()
        return s[-1] if s else None

    def require_device(self) -> None:
        if not self.present:
            raise CudaFault(*NO_DEVICE)

    def runtime_context(self) -> Context:
        """The runtime API's context for the calling thread (primary if none is current)."""
        self.require_device()
        ctx = self.current()
        if ctx is None:
            ctx = self.primary
            self.stack().append(ctx)
        return ctx

    def driver_context(self, what: str) -> Context:
        """The driver API's: the current context or an error."""
        ctx = self.current()
        if ctx is None or not ctx.alive:
            raise CudaFault(INVALID_CONTEXT[0], f"{what} failed: {INVALID_CONTEXT[1]}")
        return ctx

    # -- memory and streams ---------------------------------------------------
    def new_id(self) -> int:
        with self.lock:
            return next(self._ids)

    def malloc(self, nbytes: int, ctx: Context) -> int:
        ptr = self.new_id()
        self.device_mem[ptr] = (np.zeros(int(nbytes), np.uint8), ctx)
        return ptr

    def device_buffer(self, ptr: int, ctx: Context, nbytes: int) -> np.ndarray:
        if int(ptr) not in self.device_mem:
            raise CudaFault(*INVALID_VALUE)
        buf, owner = self.device_mem[int(ptr)]
        if owner is not ctx and not (owner.primary and ctx.primary):
            raise CudaFault(*INVALID_VALUE)
        if nbytes > buf.nbytes:
            raise CudaFault(*INVALID_VALUE)
        return buf

    def free(self, ptr: int) -> None:
        if self.device_mem.pop(int(ptr), None) is None:
            raise CudaFault(*INVALID_VALUE)

    def host_alloc(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(int(nbytes))
        addr = ctypes.addressof(block)
        self.host_mem[addr] = block
        return addr

    def host_free(self, addr: int) -> None:
        if self.host_mem.pop(int(addr), None) is None:
            raise CudaFault(*INVALID_VALUE)

    def stream_create(self, ctx: Context) -> int:
        handle = self.new_id()
        self.streams[handle] = ctx
        return handle

    def check_stream(self, handle: int, ctx: Context) -> None:
        owner = self.streams.get(int(handle))
        if owner is None or owner is not ctx:
            raise CudaFault(*INVALID_HANDLE)

    def htod(self, dst: int, src_addr: int, nbytes: int, ctx: Context) -> None:
        buf = self.device_buffer(dst, ctx, nbytes)
        ctypes.memmove(buf.ctypes.data, src_addr, nbytes)

    def dtoh(self, dst_addr: int, src: int, nbytes: int, ctx: Context) -> None:
        buf = self.device_buffer(src, ctx, nbytes)
        ctypes.memmove(dst_addr, buf.ctypes.data, nbytes)

    def live(self) -> dict[str, int]:
        return {"device": len(self.device_mem), "host": len(self.host_mem), "streams": len(self.streams)}


# -- cuda-python (cuda.bindings.runtime) --------------------------------------------


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidContext = 201
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:
    def __init__(self, handle: int = 0) -> None:
        self._handle = int(handle)

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:
        return self._handle


def make_cudart(gpu: FakeGpu, cuda_major: int = 12, version: str = "12.9.0") -> types.ModuleType:
    """``cuda.bindings.runtime`` of a cuda-python built for CUDA ``cuda_major``."""
    rt = types.ModuleType("cuda.bindings.runtime")
    needs = cuda_major * 1000

    def call(fn: Any) -> Any:
        def wrapped(*args: Any) -> tuple[Any, ...]:
            if not gpu.present:
                return (cudaError_t.cudaErrorNoDevice,) + ((None,) if fn.__name__ in _RETURNS else ())
            if gpu.driver_version < needs:
                return (cudaError_t.cudaErrorInsufficientDriver,) + (
                    (None,) if fn.__name__ in _RETURNS else ()
                )
            try:
                out = fn(gpu.runtime_context(), *args)
            except CudaFault as exc:
                return (cudaError_t(exc.code),) + ((None,) if fn.__name__ in _RETURNS else ())
            return (cudaError_t.cudaSuccess, *(() if out is None else (out,)))

        wrapped.__name__ = fn.__name__
        return wrapped

    def cudaStreamCreate(ctx: Context) -> cudaStream_t:
        return cudaStream_t(gpu.stream_create(ctx))

    def cudaStreamDestroy(ctx: Context, stream: Any) -> None:
        gpu.check_stream(int(stream), ctx)
        del gpu.streams[int(stream)]

    def cudaStreamSynchronize(ctx: Context, stream: Any) -> None:
        gpu.check_stream(int(stream), ctx)

    def cudaMalloc(ctx: Context, nbytes: int) -> int:
        return gpu.malloc(nbytes, ctx)

    def cudaFree(ctx: Context, ptr: int) -> None:
        gpu.free(ptr)

    def cudaMallocHost(ctx: Context, nbytes: int) -> int:
        return gpu.host_alloc(nbytes)

    def cudaFreeHost(ctx: Context, ptr: int) -> None:
        gpu.host_free(ptr)

    def cudaMemcpyAsync(ctx: Context, dst: int, src: int, count: int, kind: Any, stream: Any) -> None:
        gpu.check_stream(int(stream), ctx)
        if int(kind) == cudaMemcpyKind.cudaMemcpyHostToDevice:
            gpu.htod(int(dst), int(src), int(count), ctx)
        elif int(kind) == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            gpu.dtoh(int(dst), int(src), int(count), ctx)
        else:
            raise CudaFault(*INVALID_VALUE)

    def cudaGetDeviceCount(ctx: Context) -> int:
        return 1

    def cudaGetDeviceProperties(ctx: Context, device: int) -> Any:
        return types.SimpleNamespace(
            name=gpu.name.encode(), major=gpu.compute_capability[0], minor=gpu.compute_capability[1]
        )

    for fn in (
        cudaStreamCreate,
        cudaStreamDestroy,
        cudaStreamSynchronize,
        cudaMalloc,
        cudaFree,
        cudaMallocHost,
        cudaFreeHost,
        cudaMemcpyAsync,
        cudaGetDeviceCount,
        cudaGetDeviceProperties,
    ):
        setattr(rt, fn.__name__, call(fn))

    # These two answer without a device (the driver's version is readable before any context).
    def cudaDriverGetVersion() -> tuple[Any, int]:
        return cudaError_t.cudaSuccess, gpu.driver_version

    def cudaRuntimeGetVersion() -> tuple[Any, int]:
        return cudaError_t.cudaSuccess, needs + 9 * 10 if cuda_major == 12 else needs

    rt.cudaDriverGetVersion = cudaDriverGetVersion
    rt.cudaRuntimeGetVersion = cudaRuntimeGetVersion
    rt.cudaError_t = cudaError_t
    rt.cudaMemcpyKind = cudaMemcpyKind
    rt.cudaStream_t = cudaStream_t
    rt.__version__ = version
    return rt


_RETURNS = {
    "cudaStreamCreate",
    "cudaMalloc",
    "cudaMallocHost",
    "cudaGetDeviceCount",
    "cudaGetDeviceProperties",
}


def install_cuda_python(
    monkeypatch: Any, gpu: FakeGpu, cuda_major: int = 12, version: str = "12.9.0"
) -> None:
    rt = make_cudart(gpu, cuda_major, version)
    cuda = types.ModuleType("cuda")
    cuda.__path__ = []  # a package
    bindings = types.ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.__version__ = version
    bindings.runtime = rt
    cuda.bindings = bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)


# -- pycuda -------------------------------------------------------------------------


def make_pycuda_driver(gpu: FakeGpu, version: str = "2025.1") -> types.ModuleType:
    drv = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    class CudaRuntimeError(Error):
        pass

    def check(what: str) -> Context:
        try:
            return gpu.driver_context(what)
        except CudaFault as exc:
            raise LogicError(exc.text) from None

    state = {"init": False}

    def init(flags: int = 0) -> None:
        if not gpu.present:
            raise CudaRuntimeError("cuInit failed: no CUDA-capable device is detected")
        state["init"] = True

    class PyContext:
        def __init__(self, ctx: Context) -> None:
            self._ctx = ctx

        def push(self) -> None:
            gpu.stack().append(self._ctx)

        @staticmethod
        def pop() -> None:
            s = gpu.stack()
            if not s:
                raise LogicError("cuCtxPopCurrent failed: invalid device context")
            s.pop()

        @staticmethod
        def get_current() -> PyContext | None:
            c = gpu.current()
            return None if c is None else PyContext(c)

        def detach(self) -> None:
            s = gpu.stack()
            if s and s[-1] is self._ctx:
                s.pop()
            if not self._ctx.primary:
                self._ctx.alive = False

        def synchronize(self) -> None:
            check("cuCtxSynchronize")

    class Device:
        def __init__(self, ordinal: int) -> None:
            if not state["init"]:
                raise LogicError("cuDeviceGet failed: initialization error")
            if ordinal != 0:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")

        def name(self) -> str:
            return gpu.name

        def compute_capability(self) -> tuple[int, int]:
            return gpu.compute_capability

        def make_context(self, flags: int = 0) -> PyContext:
            ctx = Context(gpu, primary=False)
            gpu.stack().append(ctx)
            return PyContext(ctx)

        def retain_primary_context(self) -> PyContext:
            return PyContext(gpu.primary)

    class DeviceAllocation:
        def __init__(self, ptr: int) -> None:
            self.ptr = ptr
            self.freed = False

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            if not self.freed:
                gpu.free(self.ptr)
                self.freed = True

    class HostAllocation(bytearray):
        def free(self) -> None:
            gpu.host_mem.pop(id(self), None)

    class Stream:
        def __init__(self, flags: int = 0) -> None:
            self.handle = gpu.stream_create(check("cuStreamCreate"))

        def synchronize(self) -> None:
            check("cuStreamSynchronize")

        def __del__(self) -> None:  # pycuda destroys the stream when the object goes
            gpu.streams.pop(self.handle, None)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return DeviceAllocation(gpu.malloc(nbytes, check("cuMemAlloc")))

    def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
        check("cuMemHostAlloc")
        dt = np.dtype(dtype)
        alloc = HostAllocation(max(1, int(np.prod(shape)) * dt.itemsize))
        gpu.host_mem[id(alloc)] = alloc
        return np.ndarray(shape, dt, buffer=alloc, order=order)

    def _copy(what: str, stream: Stream, fn: Any) -> None:
        ctx = check(what)
        try:
            gpu.check_stream(stream.handle, ctx)
            fn(ctx)
        except CudaFault as exc:
            raise LogicError(f"{what} failed: {exc.text}") from None

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream) -> None:
        _copy("cuMemcpyHtoDAsync", stream, lambda ctx: gpu.htod(int(dest), src.ctypes.data, src.nbytes, ctx))

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream) -> None:
        _copy("cuMemcpyDtoHAsync", stream, lambda ctx: gpu.dtoh(dest.ctypes.data, int(src), dest.nbytes, ctx))

    def get_version() -> tuple[int, int, int]:
        return (gpu.driver_version // 1000, gpu.driver_version % 1000 // 10, 0)

    def get_driver_version() -> int:
        return gpu.driver_version

    for obj in (
        init,
        Device,
        DeviceAllocation,
        HostAllocation,
        Stream,
        mem_alloc,
        pagelocked_empty,
        memcpy_htod_async,
        memcpy_dtoh_async,
        get_version,
        get_driver_version,
    ):
        setattr(drv, obj.__name__, obj)
    drv.Context = PyContext
    drv.Error = Error
    drv.LogicError = LogicError
    drv.RuntimeError = CudaRuntimeError
    drv.VERSION = tuple(int(x) for x in version.split("."))
    return drv


class _AutoinitFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``pycuda.autoinit``'s side effect on import, like the real module."""

    def __init__(self, drv: types.ModuleType) -> None:
        self.drv = drv

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "pycuda.autoinit":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        self.drv.init()
        module.device = self.drv.Device(0)
        module.context = module.device.make_context()  # current in the importing thread only


def install_pycuda(monkeypatch: Any, gpu: FakeGpu, version: str = "2025.1") -> types.ModuleType:
    drv = make_pycuda_driver(gpu, version)
    pkg = types.ModuleType("pycuda")
    pkg.__path__ = []
    pkg.driver = drv
    pkg.VERSION_TEXT = version
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.delitem(sys.modules, "pycuda.autoinit", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_AutoinitFinder(drv), *sys.meta_path])
    return drv


def block_module(monkeypatch: Any, *names: str) -> None:
    """Make ``import name`` fail with ImportError, as on a machine without the package."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
