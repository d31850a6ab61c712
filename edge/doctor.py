"""``pouta-edge doctor``: what this machine can run, and the exact reason when not.

Line engineers run it first on a new Jetson or GPU PC: TensorRT, CUDA driver,
cuda-python and pycuda versions, whether a GPU is usable, which backend a ``.plan``
would use, and (with ``--plan``) whether that plan opens. Every probe catches its own
failure and reports it as one line; nothing here needs a GPU to run.
"""

from __future__ import annotations

import ctypes
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.tensorrt import MIN_TENSORRT
from .contract.errors import PoutaError

L4T_RELEASE = Path("/etc/nv_tegra_release")
# L4T major release -> JetPack, and what it means here.
JETPACKS = {
    35: (
        "JetPack 5.x",
        "ships TensorRT 8.5: too old for .plan files here (8.6+); use .onnx with ONNX Runtime",
    ),
    36: ("JetPack 6.x", "CUDA 12 driver: cuda-python 12.x (pip install 'cuda-python>=12.6,<13')"),
    38: ("JetPack 7.x", "CUDA 13 driver: cuda-python 13.x (pip install 'cuda-python>=13,<14')"),
}


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok ' if self.ok else '-- '} {self.name}: {self.detail}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def jetpack_from_l4t(text: str) -> str | None:
    """'JetPack 6.x (L4T R36.4.0): ...' from /etc/nv_tegra_release, or None if not L4T."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None
    major = int(m.group(1))
    name, note = JETPACKS.get(major, (f"unknown JetPack (L4T R{major})", "not a release checked here"))
    return f"{name} (L4T R{major}.{m.group(2)}): {note}"


def driver_version() -> tuple[int | None, str]:
    """The CUDA driver's version as CUDA_VERSION (12060 = 12.6) and where it was read."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return v.value, lib
    try:
        from .backends.cuda_memory import import_cudart

        err, v = import_cudart().cudaDriverGetVersion()
        if int(err) == 0 and v:
            return int(v), "cuda-python"
    except ImportError:
        pass
    try:
        import pycuda.driver as drv

        return int(drv.get_driver_version()), "pycuda"
    except ImportError:
        pass
    return None, "no NVIDIA driver found (libcuda.so.1 does not load)"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot build or run plans here, or None when it can."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"tensorrt is not importable ({_first_line(exc)})"
    version = str(trt.__version__)
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) < MIN_TENSORRT:
        return f"TensorRT {version} is too old: {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer is needed"
    try:
        trt.Runtime(trt.Logger(trt.Logger.ERROR))
    except TypeError as exc:  # pybind11 "factory function returned nullptr"
        return f"TensorRT {version} is installed but finds no usable CUDA GPU ({_first_line(exc)})"
    return None


def _package_version(dists: tuple[str, ...], modules: tuple[str, ...]) -> str:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    for module in modules:  # JetPack's apt packages carry no pip metadata
        mod = sys.modules.get(module)
        version = getattr(mod, "__version__", None) or getattr(mod, "VERSION_TEXT", None)
        if version:
            return str(version)
    return "version unknown"


def _binding(name: str, modules: tuple[str, ...], dists: tuple[str, ...]) -> Finding:
    from .backends.cuda_memory import CudaError, open_implementation

    try:
        mem = open_implementation(name)
    except ImportError as exc:
        return Finding(name, False, f"not installed ({_first_line(exc)})")
    except CudaError as exc:
        return Finding(name, False, f"{_package_version(dists, modules)} installed, but unusable: {exc}")
    mem.close()
    return Finding(name, True, f"{_package_version(dists, modules)}, opens a stream on the GPU")


def diagnose(plan: Path | None = None, l4t_release: Path = L4T_RELEASE) -> tuple[list[Finding], bool]:
    """All findings, and whether a .plan can run here."""
    out = [Finding("python", True, f"{platform.python_version()} on {platform.machine()} ({sys.executable})")]
    if l4t_release.is_file():
        jp = jetpack_from_l4t(l4t_release.read_text(errors="replace"))
        out.append(
            Finding("jetson", jp is not None and "too old" not in jp, jp or "unrecognised L4T release file")
        )
    drv, where = driver_version()
    out.append(
        Finding("cuda driver", drv is not None, f"CUDA {_cuda_version(drv)} (from {where})" if drv else where)
    )
    trt_reason = tensorrt_problem()
    if trt_reason is None:
        import tensorrt as trt

        out.append(
            Finding(
                "tensorrt", True, f"{trt.__version__} ({Path(getattr(trt, '__file__', None) or '?').parent})"
            )
        )
    else:
        out.append(Finding("tensorrt", False, trt_reason))
    bindings = [
        _binding("cuda-python", ("cuda.bindings", "cuda"), ("cuda-python", "cuda-bindings")),
        _binding("pycuda", ("pycuda",), ("pycuda",)),
    ]
    out += bindings
    usable = [b.name for b in bindings if b.ok]
    if trt_reason is None and usable:
        out.append(Finding(".plan backend", True, f"tensorrt:{usable[0]}"))
    else:
        why = [trt_reason] if trt_reason else []
        if not usable:
            why.append("no CUDA binding opens (install cuda-python matching the driver, or pycuda)")
        out.append(
            Finding(
                ".plan backend", False, "unavailable: " + "; ".join(why) + " (.onnx runs on ONNX Runtime)"
            )
        )
    if plan is not None:
        out.append(_open_plan(plan))
    runnable = all(f.ok for f in out if f.name in (".plan backend", "plan"))
    return out, runnable


def _open_plan(plan: Path) -> Finding:
    from .backends.tensorrt import TensorRTBackend

    try:
        backend = TensorRTBackend(plan)
    except PoutaError as exc:
        return Finding("plan", False, str(exc))
    try:
        shapes = {n: list(s) for n, (s, _dt, _in) in backend.tensors.items()}
        return Finding("plan", True, f"{plan} opens with {backend.name}; tensors {shapes}")
    finally:
        backend.close()


def run_doctor(plan: str | None = None, out: Callable[[str], Any] = print) -> int:
    findings, runnable = diagnose(Path(plan) if plan else None)
    for f in findings:
        out(f.line())
    out(
        "verdict: .plan files run here"
        if runnable
        else "verdict: .plan files cannot run here (see '--' lines)"
    )
    return 0 if runnable else 2
