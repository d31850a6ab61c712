"""ONNX Runtime backend: a session for a contract model, CPU unless providers say otherwise.

Also tells a Q/DQ graph whose activations are signed int8 (the TensorRT flavour) apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

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


def has_signed_int8_activations(path: str | os.PathLike[str]) -> bool:
    """True for a Q/DQ graph that quantizes activations to signed int8 (the TensorRT file).

    Only weights are initializers; a QuantizeLinear of anything else with an int8 zero
    point quantizes an activation.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name: t for t in graph.initializer}
    return any(
        n.op_type == "QuantizeLinear"
        and n.input[0] not in consts
        and len(n.input) > 2
        and n.input[2] in consts
        and consts[n.input[2]].data_type == onnx.TensorProto.INT8
        for n in graph.node
    )


class OnnxRuntimeBackend:
    """ONNX Runtime session for a contract model. CPU unless providers say otherwise."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: ModelMetadata | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: model file not found")
        self.metadata = metadata if metadata is not None else load_for_model(self.path)
        available = ort.get_available_providers()
        wanted = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ConfigError(
                f"providers: {missing} not available in this onnxruntime build (available: {available})"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            signed_int8 = wanted[0] == "CPUExecutionProvider" and has_signed_int8_activations(self.path)
        except Exception as exc:  # onnx's DecodeError and friends: a truncated or corrupt file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MetadataError(f"{self.path}: not a readable ONNX model ({first})") from None
        if signed_int8:
            # ONNX Runtime's CPU fusion of signed-int8 Q/DQ into integer kernels computes
            # wrong maps on CPUs without AVX-512 (microsoft/onnxruntime#24711); unfused, the
            # Q/DQ pairs run as float rounding, which is also what TensorRT's int8 computes.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if not spin:
            # Idle intra-op workers otherwise busy-wait after each run and take CPU from
            # acquisition and writing on a small box (in the benchmark's interleaved loop
            # they slowed the next session up to 2x on 2 cores).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MetadataError(f"{self.path}: ONNX Runtime cannot load the model ({first})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs:
            raise MetadataError(f"{self.path}: has no input '{INPUT_NAME}' (inputs: {sorted(inputs)})")
        outputs = [o.name for o in self.session.get_outputs()]
        check_io(self.metadata, tuple(inputs[INPUT_NAME].shape), outputs, str(self.path))
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime:{self.providers[0].replace('ExecutionProvider', '').lower()}"
        self._outputs = [OUTPUT_ANOMALY_MAP, OUTPUT_SCORE]

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.metadata.input.height, self.metadata.input.width

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.session.run(self._outputs, {INPUT_NAME: batch})
        return amap, score

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
