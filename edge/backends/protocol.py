"""Inference backends behind one protocol, chosen from the model file.

``.onnx`` -> ONNX Runtime (``onnx_runtime``: CPU by default, CUDA/TensorRT execution
providers when asked for and installed); ``.plan``/``.engine`` -> TensorRT
(``tensorrt``). Every backend checks the artifact's own tensor shapes against its
metadata sidecar and refuses a mismatch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..contract.errors import ConfigError
from ..contract.metadata import (
    ModelMetadata,
)

ONNX_SUFFIXES = (".onnx",)
TENSORRT_SUFFIXES = (".plan", ".engine", ".trt")


@runtime_checkable
class Backend(Protocol):
    """Runs a batch [N,3,H,W] float32 and returns (anomaly_map [N,1,H,W], score [N])."""

    name: str
    metadata: ModelMetadata

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def open_backend(
    path: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    spin: bool = True,
) -> Backend:
    """The backend for a model file, chosen by its suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        from .onnx_runtime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(p, providers=providers, threads=threads, spin=spin)
    if suffix in TENSORRT_SUFFIXES:
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(p)
    raise ConfigError(
        f"{p}: unknown model type '{suffix}', expected one of {ONNX_SUFFIXES + TENSORRT_SUFFIXES}"
    )
