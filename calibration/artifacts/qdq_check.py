"""What a quantized Q/DQ ONNX file really holds, read from its graph (not trusted from the
quantizer's options): TensorRT's Q/DQ rules and the weight layers that were quantized."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

MIN_QDQ_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis attribute)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_tensorrt_qdq(model: onnx.ModelProto | str | os.PathLike[str]) -> list[str]:
    """Problems that would make a Q/DQ file wrong for TensorRT (empty list: none).

    Read from the graph itself rather than trusted from the quantizer's options: every
    scale positive and finite, every zero point present, int8 and 0, weights per-channel
    on the output-channel axis, opset >= 13, no int32 (bias) dequantization.
    """
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    problems: list[str] = []
    opset = default_opset(m)
    if opset < MIN_QDQ_OPSET:
        problems.append(f"opset {opset} < {MIN_QDQ_OPSET}")
    inits = {t.name: t for t in m.graph.initializer}
    consts = {
        n.output[0]: next(a.t for a in n.attribute if a.name == "value")
        for n in m.graph.node
        if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
    }
    tensors = {**consts, **inits}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    n_qdq = 0
    for node in m.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n_qdq += 1
        where = f"{node.op_type} {node.name or node.output[0]}"
        scale = tensors.get(node.input[1])
        if scale is None:
            problems.append(f"{where}: scale is not a constant")
            continue
        s = numpy_helper.to_array(scale)
        if not (np.all(np.isfinite(s)) and np.all(s > 0)):
            problems.append(f"{where}: scale has non-positive or non-finite values")
        if len(node.input) < 3 or not node.input[2]:
            # An omitted zero point means uint8, which TensorRT rejects.
            problems.append(f"{where}: zero point missing (defaults to uint8)")
            continue
        zp_t = tensors.get(node.input[2])
        if zp_t is None:
            problems.append(f"{where}: zero point is not a constant")
            continue
        zp = numpy_helper.to_array(zp_t)
        if zp.dtype != np.int8:
            problems.append(f"{where}: zero point dtype {zp.dtype}, expected int8")
        if np.any(zp != 0):
            problems.append(f"{where}: non-zero zero point")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.dtype != np.int8:
                problems.append(f"{where}: dequantizes {w.dtype} data (TensorRT takes int8 only)")
            elif w.size and int(w.min()) < -127:
                # TensorRT's int8 weights are [-127, 127]; -128 breaks the symmetry it assumes.
                problems.append(f"{where}: int8 weight value -128 (TensorRT expects [-127, 127])")
            for user in consumers.get(node.output[0], []):
                if user.op_type in WEIGHT_AXIS and len(user.input) > 1 and user.input[1] == node.output[0]:
                    want = WEIGHT_AXIS[user.op_type]
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                    # A one-channel conv (POUTA's spatial gate) has one scale either way.
                    if s.size != w.shape[want] or (s.size > 1 and axis != want):
                        problems.append(
                            f"{where}: {user.op_type} weight not per-channel on axis {want} "
                            f"(axis {axis}, {s.size} scales for shape {list(w.shape)})"
                        )
    if n_qdq == 0:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: the model is not quantized")
    return problems


def quantized_weight_layers(model: onnx.ModelProto) -> list[str]:
    """Names of Conv/ConvTranspose/Gemm/MatMul nodes that run in int8 in this graph."""
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for n in model.graph.node:
        integer_op = n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger")
        qdq_op = n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in dq_out
        if integer_op or qdq_op:
            out.append(n.name)
    return out
