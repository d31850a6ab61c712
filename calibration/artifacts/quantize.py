"""INT8 artifacts from one calibration set with ONNX Runtime static quantization.

Two files come out of one calibration pass (the activation ranges are computed once and
reused through ONNX Runtime's calibration cache):

- ``model.int8.trt.onnx`` for TensorRT: Q/DQ, symmetric signed int8 activations and
  weights (every zero point 0), per-channel weights on the output-channel axis (Conv: 0,
  ConvTranspose: 1), float biases. This explicit-quantization form is the only INT8 path
  TensorRT keeps from 11.0 on, and TensorRT's int8 kernels assume zero point 0.
- ``model.int8.onnx`` for ONNX Runtime on CPU: uint8 activations, int8 per-channel weights
  (u8s8) on a 7-bit range, QDQ format by default. ONNX Runtime's x86 integer conv kernels
  are built for u8s8 (the s8s8 TensorRT file is markedly slower there; benchmarks/reports
  has the numbers); without AVX-512 VNNI they add products pairwise in int16, which
  8-bit weights can saturate. QDQ is also the form other execution providers understand;
  ``cpu_format="qoperator"`` remains available. ONNX Runtime runs the TensorRT file
  unfused (``edge.backend``), as a float emulation of TensorRT's int8.

Never quantized (``exclusions``): the nearest-neighbour distance of the pretrained-backbone
kinds to their memory of normal features (``memory_distance_exclusions``), and the detection head. The anomaly map is a probability
that the image score and both thresholds are read from; int8 would put it on a grid of
1/127 (or 1/255) and move scores that sit near the threshold across it. Concretely:
the Softmax/Sigmoid producing ``anomaly_map``, every node between it and the outputs
(channel slice, upsampling, the fixed map smoothing, the 21x21 score AveragePool,
ReduceMax), and the last Conv/ConvTranspose feeding it, whose logits the saturating
softmax/sigmoid amplifies near 0. Sigmoid/Softmax elsewhere (POUTA's HSG gates) are not quantized either: their
[0, 1] outputs multiply feature maps, and a symmetric int8 grid spends half its codes on
negative values they never take.

The CPU file also keeps the first convolutions on the input image in float
(``input_conv_exclusions``): with 7-bit weights and three input channels, their rounding
error reaches every later layer and the reconstruction cue, and they are a small share of
the network's work. The TensorRT file quantizes them (symmetric 8-bit weights; its guard
rows did not gain from it).

Longer than ~350 lines on purpose: one flow (prepare, head exclusions, two
``quantize_static`` targets, check) with the ONNX Runtime options it depends on; the
Q/DQ rules are in ``qdq_check``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from pouta.edge.contract.fsutil import atomic_path
from pouta.edge.contract.metadata import INPUT_NAME, OUTPUT_ANOMALY_MAP, OUTPUT_SCORE, VALUE_RANGE

from ..errors import CalibrationError
from .qdq_check import MIN_QDQ_OPSET, WEIGHT_AXIS, check_tensorrt_qdq, default_opset

CALIB_METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
DEFAULT_CALIB_METHOD = "minmax"
TRT_SUFFIX = ".int8.trt.onnx"
CPU_SUFFIX = ".int8.onnx"
# Probability-valued gates: see the module docstring.
NEVER_QUANTIZE_OP_TYPES = frozenset({"Sigmoid", "Softmax"})
# Nodes that only select, reshape or resample the map on its way to the outputs.
_HEAD_PASS_THROUGH = frozenset(
    {
        "Sigmoid",
        "Softmax",
        "Slice",
        "Gather",
        "Split",
        "Squeeze",
        "Unsqueeze",
        "Reshape",
        "Flatten",
        "Resize",
        "Upsample",
        "AveragePool",
        "ReduceMax",
        "ReduceMean",
        "Identity",
        "Cast",
        "Clip",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Pow",
        # The reconstruction cue's SSIM stacks its local moments; the walk reaches a Concat
        # only through fixed filters, never past a logit conv (the features' concats).
        "Concat",
    }
)


def artifact_path(model: str | os.PathLike[str], suffix: str) -> Path:
    """``model.onnx`` + ``.int8.onnx`` -> ``model.int8.onnx`` (beside the source)."""
    p = Path(model)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + suffix)


def op_types_to_quantize() -> list[str]:
    """Every op type ONNX Runtime can quantize, less the probability gates."""
    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - NEVER_QUANTIZE_OP_TYPES)


def prepare_model(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """``quant_pre_process`` (shape inference + graph cleanup), opset >= 13, named nodes.

    The symbolic shape inference inside needs sympy; without it the step runs with
    ONNX's own shape inference only. Node names are made unique because exclusions are
    given to the quantizer by name and exported graphs may leave names empty.
    """
    dst = Path(dst)
    has_sympy = importlib.util.find_spec("sympy") is not None
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=not has_sympy)
    except Exception as exc:  # the pre-processor raises assorted onnx/ort/sympy errors
        raise CalibrationError(f"{src}: quantization pre-processing failed ({exc})") from None
    model = onnx.load(str(dst))
    opset = default_opset(model)
    if opset < MIN_QDQ_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_QDQ_OPSET)
    _name_nodes(model)
    onnx.save(model, str(dst))
    return dst


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def head_exclusions(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes of the detection head, by name, with the reason each stays in float.

    Walks back from both contract outputs through map-preserving ops (softmax/sigmoid,
    channel slices, resizes, pooling, reductions) and stops after the first
    Conv/ConvTranspose on each path, which is the head's logit layer. Convs that filter each
    channel on its own on the way (the model's fixed Gaussian blur of the map, the
    reconstruction cue's SSIM window) are walked through.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # weights exported as Constant nodes count too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    excluded: dict[str, str] = {}
    queue: deque[str] = deque([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE])
    visited: set[str] = set()
    while queue:
        tensor = queue.popleft()
        node = producers.get(tensor)
        if node is None or node.name in visited:
            continue
        visited.add(node.name)
        if node.op_type == "Conv" and _is_channelwise_filter(node, shapes):
            excluded[node.name] = "fixed filter of the map or the reconstruction cue (per channel)"
            queue.extend(i for i in node.input if i)
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            excluded[node.name] = "head logit conv: its errors are amplified by the softmax/sigmoid near 0"
            continue
        if node.op_type not in _HEAD_PASS_THROUGH:
            continue
        excluded[node.name] = _HEAD_REASONS.get(node.op_type, "between the anomaly map and the outputs")
        queue.extend(i for i in node.input if i)
    return excluded


def memory_distance_exclusions(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul/Gemm nodes with a constant operand, by name, with the reason: in the kinds that
    have them (``features``, ``prn``) they compare patch features with a memory of normal
    ones, d^2 = |q|^2 - 2 q.m + |m|^2, where the two large terms cancel: int8 rounding of
    q.m moves the small distances of good parts most, which is where the threshold sits.
    (``redi``'s retrieval, descriptor . gallery descriptors, is one too: an int8 rounding
    could pick another gallery image.)
    (Attention products between activations have no constant operand and are quantized.)
    """
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    producers = {out: node for node in model.graph.node for out in node.output}

    def constant(name: str) -> bool:
        # a transposed memory (Transpose of an initializer) is still the memory
        node = producers.get(name)
        return name in constants or (
            node is not None and node.op_type == "Transpose" and node.input[0] in constants
        )

    return {
        node.name: "nearest-neighbour distance to the normal-feature memory (|q|^2 - 2 q.m + |m|^2 cancels)"
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and any(constant(i) for i in node.input)
    }


def input_conv_exclusions(model: onnx.ModelProto) -> dict[str, str]:
    """The first Conv/ConvTranspose on every path from the image input, by name, with the reason.

    Walks forward from the graph input through any non-conv op (normalisation, Concat of
    the image with a reconstruction) and stops at the first conv of each path.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    excluded: dict[str, str] = {}
    queue: deque[str] = deque([INPUT_NAME])
    visited: set[str] = set()
    while queue:
        for node in consumers.get(queue.popleft(), []):
            if node.name in visited:
                continue
            visited.add(node.name)
            if node.op_type in ("Conv", "ConvTranspose"):
                excluded[node.name] = (
                    "first conv on the input image (CPU file: 7-bit weight rounding reaches every layer)"
                )
                continue
            queue.extend(o for o in node.output if o)
    return excluded


def _is_channelwise_filter(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A Conv that filters each channel on its own (one input channel per group, as many
    groups as outputs): a blur of the map or a local window, not a logit layer."""
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return w is not None and len(w) == 4 and w[1] == 1 and group == w[0]


_HEAD_REASONS = {
    "Sigmoid": "produces the anomaly probability the thresholds are read from",
    "Softmax": "produces the anomaly probability the thresholds are read from",
    "AveragePool": "21x21 score pooling: the image score must keep full precision near the threshold",
    "ReduceMax": "image score reduction: the score must keep full precision near the threshold",
    "Resize": "upsamples the anomaly map to input size",
    "Upsample": "upsamples the anomaly map to input size",
}


@dataclass
class QuantizeResult:
    path: Path
    target: str  # "tensorrt" | "onnxruntime-cpu"
    quant_format: str  # "qdq" | "qoperator"
    activation_type: str
    weight_type: str
    excluded: dict[str, str] = field(default_factory=dict)
    extra_options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "format": self.quant_format,
            "activations": self.activation_type,
            "weights": self.weight_type + "-per-channel",
            "excluded_nodes": self.excluded,
            "not_quantized_op_types": sorted(NEVER_QUANTIZE_OP_TYPES),
            "extra_options": _to_json(self.extra_options),
        }


def _to_json(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _to_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_to_json(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def tensorrt_options() -> dict[str, Any]:
    """``extra_options`` for the TensorRT Q/DQ file (why each is set is in the comments)."""
    return {
        # Zero point 0 for every activation: TensorRT's int8 is symmetric only.
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # TensorRT takes float biases and folds them into the int8 conv itself; an int32
        # DequantizeLinear on a bias does not parse in TensorRT 8.6.
        "QuantizeBias": False,
        # Keep Relu/Clip in the graph: TensorRT fuses them with the conv, and removing
        # them is only valid when the Q/DQ pairs are kept, which is TensorRT's choice.
        "QDQKeepRemovableActivations": True,
        "QDQOpTypePerChannelSupportToAxis": dict(WEIGHT_AXIS),
        "TensorQuantOverrides": input_range_override(),
    }


def input_range_override() -> dict[str, list[dict[str, np.float32]]]:
    # The contract fixes the input to [0, 1]; calibrating it would clip bright defects
    # to the brightest normal pixel.
    lo, hi = (np.float32(v) for v in VALUE_RANGE)
    return {INPUT_NAME: [{"rmin": lo, "rmax": hi}]}


def cpu_options() -> dict[str, Any]:
    return {
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": dict(WEIGHT_AXIS),
        "TensorQuantOverrides": input_range_override(),
    }


def _supports_cache() -> bool:
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_pair(
    fp32_model: str | os.PathLike[str],
    reader: CalibrationDataReader,
    trt_out: str | os.PathLike[str] | None = None,
    cpu_out: str | os.PathLike[str] | None = None,
    method: str = DEFAULT_CALIB_METHOD,
    cpu_format: str = "qdq",
) -> list[QuantizeResult]:
    """Quantize ``fp32_model`` into the TensorRT and/or CPU artifact from one reader."""
    if method not in CALIB_METHODS:
        raise CalibrationError(
            f"calibration method {method!r} is unknown, expected one of {sorted(CALIB_METHODS)}"
        )
    if cpu_format not in ("qoperator", "qdq"):
        raise CalibrationError(f"cpu format {cpu_format!r} is unknown, expected 'qoperator' or 'qdq'")
    results: list[QuantizeResult] = []
    with tempfile.TemporaryDirectory(prefix="pouta-quant-") as tmp:
        prepared = prepare_model(fp32_model, Path(tmp) / "prepared.onnx")
        model = onnx.load(str(prepared))
        excluded = {**memory_distance_exclusions(model), **head_exclusions(model)}
        cache = Path(tmp) / "calibration_cache.json" if _supports_cache() else None
        # (file, target, format, activation type, 7-bit weights, extra options, nodes kept in float)
        jobs: list[tuple[Path, str, QuantFormat, QuantType, bool, dict[str, Any], dict[str, str]]] = []
        if trt_out is not None:
            jobs.append(
                (
                    Path(trt_out),
                    "tensorrt",
                    QuantFormat.QDQ,
                    QuantType.QInt8,
                    False,
                    tensorrt_options(),
                    excluded,
                )
            )
        if cpu_out is not None:
            fmt = QuantFormat.QOperator if cpu_format == "qoperator" else QuantFormat.QDQ
            # 7-bit weights: without AVX-512 VNNI, ONNX Runtime's u8 x s8 kernels sum pairs of
            # products in int16, which saturates for bright inputs times large 8-bit weights
            # (a defect's map came out halved); 255 * 63 * 2 fits.
            cpu_excluded = {**input_conv_exclusions(model), **excluded}
            jobs.append(
                (Path(cpu_out), "onnxruntime-cpu", fmt, QuantType.QUInt8, True, cpu_options(), cpu_excluded)
            )
        for out, target, fmt, act_type, seven_bit, options, kept in jobs:
            reader.rewind()
            kwargs: dict[str, Any] = {}
            if cache is not None:
                kwargs["calibration_cache_path"] = str(cache)
            tmp_out = Path(tmp) / out.name
            try:
                with _quiet_shape_warnings():
                    quantize_static(
                        str(prepared),
                        str(tmp_out),
                        calibration_data_reader=reader,
                        quant_format=fmt,
                        op_types_to_quantize=op_types_to_quantize(),
                        per_channel=True,
                        reduce_range=seven_bit,
                        activation_type=act_type,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=sorted(kept),
                        calibrate_method=CALIB_METHODS[method],
                        extra_options=options,
                        **kwargs,
                    )
            except Exception as exc:
                raise CalibrationError(
                    f"{fp32_model}: ONNX Runtime quantization for {target} failed ({exc})"
                ) from None
            quantized = onnx.load(str(tmp_out))
            quantized.producer_name = "pouta-calibration"
            onnx.checker.check_model(quantized)
            if target == "tensorrt":
                problems = check_tensorrt_qdq(quantized)
                if problems:
                    raise CalibrationError(
                        f"{out}: the quantized file breaks TensorRT's Q/DQ rules: {'; '.join(problems[:3])}"
                    )
            _save_atomic(quantized, out)
            results.append(
                QuantizeResult(
                    path=out,
                    target=target,
                    quant_format="qdq" if fmt == QuantFormat.QDQ else "qoperator",
                    activation_type="int8-symmetric" if act_type == QuantType.QInt8 else "uint8-asymmetric",
                    weight_type="int8-symmetric",
                    excluded=dict(kept),
                    extra_options=options,
                )
            )
    return results


class _DropShapeWarnings(logging.Filter):
    # ONNX Runtime warns once per int64 shape tensor (Shape->Gather->Resize sizes) that
    # it cannot quantize; they are not meant to be quantized, and dozens of lines of
    # them would hide the build's real progress output.
    def filter(self, record: logging.LogRecord) -> bool:
        return "unsupported type to quantize" not in record.getMessage()


@contextlib.contextmanager
def _quiet_shape_warnings() -> Iterator[None]:
    f = _DropShapeWarnings()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
