"""FP32 ONNX -> FP16 ONNX with FP32 inputs and outputs.

TensorRT 11 has no FP16 builder flag: a strongly typed network runs in the precision its
ONNX tensors have, so FP16 must already be in the file. The same file runs in ONNX
Runtime (CPU inserts casts around ops it has no FP16 kernel for), which is how it is
checked against FP32 without a GPU. Inputs and outputs stay FP32 so the runtime, the
preprocessing and the metadata contract do not change with precision.

The whole graph goes to FP16, head included: onnxconverter-common (1.16) writes invalid
or FP16-output graphs when head nodes are put on its block lists (tried: the pooled score
came back FP16). Instead, each artifact's thresholds are calibrated on that artifact's
own scores, so FP16 rounding of the score is inside the threshold, and the accuracy
guard measures the FP16-vs-FP32 score difference.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
from onnx import helper
from onnxconverter_common import float16

from ..errors import CalibrationError
from .quantize import _name_nodes, _save_atomic

FP16_SUFFIX = ".fp16.onnx"


def convert_to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write the FP16 model (FP32 ``image`` in, FP32 ``anomaly_map``/``score`` out) to ``dst``."""
    model = onnx.load(str(src))
    _name_nodes(model)
    _isolate_outputs(model)
    try:
        with warnings.catch_warnings():
            # One warning per tiny weight flushed to FP16's smallest normal: noise, not news.
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST)
            )
        converted.producer_name = "pouta-calibration"
        onnx.checker.check_model(converted)
        _check_io_float32(converted)
    except Exception as exc:  # converter and checker raise a variety of types
        raise CalibrationError(f"{src}: FP16 conversion failed ({exc})") from None
    dst = Path(dst)
    _save_atomic(converted, dst)
    return dst


def _check_io_float32(model: onnx.ModelProto) -> None:
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise CalibrationError(
                f"FP16 conversion left '{vi.name}' as non-FP32; the runtime contract needs FP32 I/O"
            )


def _isolate_outputs(model: onnx.ModelProto) -> list[str]:
    """Give every graph output its own Identity node; returns the new node names.

    onnxconverter-common (1.16) produces an invalid graph when a graph output is also read
    by another node (``anomaly_map`` feeds the score pooling): the tensor gets FP32 from
    ``keep_io_types`` and FP16 from its consumer. With a private Identity per output,
    the internal tensor and the graph output no longer share a name.
    """
    outputs = [o.name for o in model.graph.output]
    internal = {name: f"{name}__internal" for name in outputs}
    for node in model.graph.node:
        for i, t in enumerate(node.output):
            if t in internal:
                node.output[i] = internal[t]
        for i, t in enumerate(node.input):
            if t in internal:
                node.input[i] = internal[t]
    names = []
    for name in outputs:
        node_name = f"{name}__output"
        model.graph.node.append(helper.make_node("Identity", [internal[name]], [name], name=node_name))
        names.append(node_name)
    return names
