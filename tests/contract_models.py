"""Small ONNX models that follow the exported-model contract, built without torch.

``make_brightness_model`` is a real (if simple) detector: a pixel is anomalous when its
3x3-mean brightness exceeds ``level``. Tests draw bright spots on dark parts, so the
verdicts it produces can be right or wrong, and the pipeline is judged on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pouta.edge.contract.metadata import (
    INPUT_NAME,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_SCORE,
    SCORE_POOL_SIZE,
    InputSpec,
    ModelMetadata,
    Thresholds,
    metadata_path,
)


def make_brightness_model(
    path: str | Path,
    height: int = 64,
    width: int = 64,
    level: float = 0.5,
    gain: float = 20.0,
    image_threshold: float = 0.5,
    pixel_threshold: float = 0.5,
    opset: int = 17,
    with_metadata: bool = True,
) -> Path:
    path = Path(path)
    hidden = 4
    w1 = np.full((hidden, 3, 3, 3), 1.0 / 27.0, dtype=np.float32)
    w1 *= np.linspace(0.8, 1.2, hidden, dtype=np.float32)[:, None, None, None]
    b1 = np.zeros(hidden, dtype=np.float32)
    # An identity 1x1 conv between the two: a quantizable layer past the first conv on the
    # image, which the CPU INT8 file keeps in float.
    w_mid = np.eye(hidden, dtype=np.float32)[:, :, None, None]
    b_mid = np.zeros(hidden, dtype=np.float32)
    w2 = np.full((1, hidden, 1, 1), gain / hidden, dtype=np.float32)
    b2 = np.array([-gain * level], dtype=np.float32)
    p = SCORE_POOL_SIZE // 2
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["h1"]),
        helper.make_node("Conv", ["h1", "w_mid", "b_mid"], ["hm"]),
        helper.make_node("Relu", ["hm"], ["hr"]),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_ANOMALY_MAP]),
        helper.make_node(
            "AveragePool",
            [OUTPUT_ANOMALY_MAP],
            ["pooled"],
            kernel_shape=[SCORE_POOL_SIZE, SCORE_POOL_SIZE],
            strides=[1, 1],
            pads=[p, p, p, p],
            count_include_pad=1,
        ),
        helper.make_node("ReduceMax", ["pooled"], [OUTPUT_SCORE], axes=[1, 2, 3], keepdims=0)
        if opset < 18
        else helper.make_node("ReduceMax", ["pooled", "axes"], [OUTPUT_SCORE], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w_mid, "w_mid"),
        numpy_helper.from_array(b_mid, "b_mid"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"))
    graph = helper.make_graph(
        nodes,
        "brightness",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, height, width])],
        [
            helper.make_tensor_value_info(OUTPUT_ANOMALY_MAP, TensorProto.FLOAT, ["N", 1, height, width]),
            helper.make_tensor_value_info(OUTPUT_SCORE, TensorProto.FLOAT, ["N"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if with_metadata:
        ModelMetadata(
            model_kind="test",
            variant="brightness",
            input=InputSpec(height=height, width=width),
            thresholds=Thresholds(image=image_threshold, pixel=pixel_threshold, rule="fixed"),
        ).save(metadata_path(path))
    return path


def dark_part(height: int, width: int, rng: np.random.Generator, defect: bool) -> np.ndarray:
    """A BGR uint8 'part': dark textured surface, with a bright spot when defective."""
    img = rng.integers(20, 60, size=(height, width, 3), dtype=np.uint8)
    if defect:
        cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
        r = max(3, min(height, width) // 6)
        yy, xx = np.ogrid[:height, :width]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 240
    return img
