"""INT8/FP16 artifacts from the contract brightness model, checked by reading the graphs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from contract_models import dark_part, make_brightness_model
from onnx import TensorProto, helper, numpy_helper
from pouta.calibration.artifacts.fp16 import convert_to_fp16
from pouta.calibration.artifacts.qdq_check import check_tensorrt_qdq, quantized_weight_layers
from pouta.calibration.artifacts.quantize import (
    head_exclusions,
    input_conv_exclusions,
    prepare_model,
    quantize_pair,
)
from pouta.calibration.calibset import ImageSetReader, load_image_set
from pouta.calibration.scoring import score_set
from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend, has_signed_int8_activations
from pouta.edge.contract.metadata import load_for_model
from pouta.edge.contract.preprocess import preprocessor_for
from pouta.trainer.metrics import roc_auc

H = W = 64


def _write_parts(folder: Path, n: int, defect: bool, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), dark_part(H, W, rng, defect))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quant")
    model = make_brightness_model(d / "model.onnx", H, W)
    normal = _write_parts(d / "normal", 24, False, 0)
    meta = load_for_model(model)
    images = load_image_set(normal, preprocessor_for(meta), n=20, min_images=8)
    results = quantize_pair(
        model, ImageSetReader(images), d / "model.int8.trt.onnx", d / "model.int8.onnx", method="minmax"
    )
    assert [r.target for r in results] == ["tensorrt", "onnxruntime-cpu"]
    fp16 = convert_to_fp16(model, d / "model.fp16.onnx")
    test_n = _write_parts(d / "test" / "good", 12, False, 1)
    test_d = _write_parts(d / "test" / "bad", 12, True, 2)
    return {
        "dir": d,
        "fp32": model,
        "trt": d / "model.int8.trt.onnx",
        "cpu": d / "model.int8.onnx",
        "fp16": fp16,
        "good": test_n,
        "bad": test_d,
    }


def _scores(path: Path, fp32: Path, folders: list[Path]) -> np.ndarray:
    meta = load_for_model(fp32)
    backend = OnnxRuntimeBackend(path, metadata=meta)
    pre = preprocessor_for(meta)
    out = []
    for folder in folders:
        s = load_image_set(folder, pre, n=None, min_images=1)
        out.append(score_set(backend, s).scores)
    return np.concatenate(out).astype(np.float64)


def _conv_weights(m: onnx.ModelProto) -> dict[str, str]:
    """'input' (the conv on the image), 'head' (the conv whose output goes to the Sigmoid)
    and 'feature' (the one between) -> what produces their weights: 'DequantizeLinear'
    (INT8) or 'float' (an initializer)."""
    producers = {o: n for n in m.graph.node for o in n.output}
    consumers = {i: n.op_type for n in m.graph.node for i in n.input}
    out = {}
    for n in m.graph.node:
        if n.op_type == "Conv":
            role = "head" if consumers.get(n.output[0]) == "Sigmoid" else "feature"
            src_node = producers.get(n.input[0])
            while src_node is not None and src_node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                src_node = producers.get(src_node.input[0])
            if src_node is None:  # reads the graph input (through Q/DQ in a QDQ file)
                role = "input"
            src = producers.get(n.input[1])
            out[role] = src.op_type if src is not None else "float"
    return out


def test_artifacts_keep_the_model_contract(built: dict[str, Path]) -> None:
    """Every artifact is a drop-in for the FP32 model: same float32 I/O with a dynamic batch,
    the same outputs for a batch of any size, and weights really stored in its precision."""
    import onnxruntime as ort

    def io(m: onnx.ModelProto) -> list[tuple[str, int, int]]:
        return [
            (v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in (*m.graph.input, *m.graph.output)
        ]

    ref = onnx.load(str(built["fp32"]))
    x = np.random.default_rng(0).random((3, 3, H, W), dtype=np.float32)
    ref_map, ref_score = ort.InferenceSession(str(built["fp32"]), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    for key in ("trt", "cpu", "fp16"):
        m = onnx.load(str(built[key]))
        onnx.checker.check_model(m)
        assert io(m) == io(ref), key
        assert all(t[1] == TensorProto.FLOAT for t in io(m)), key
        sess = ort.InferenceSession(str(built[key]), providers=["CPUExecutionProvider"])
        for n in (1, 3):
            amap, score = sess.run(None, {"image": x[:n]})
            assert amap.shape == (n, 1, H, W) and score.shape == (n,), key
            assert amap.dtype == np.float32 and np.isfinite(amap).all(), key
        assert np.abs(amap - ref_map).max() < 0.1 and np.abs(score - ref_score).max() < 0.05, key
        weights = {t.data_type for t in m.graph.initializer if len(t.dims) == 4}  # conv kernels
        want = {"fp16": TensorProto.FLOAT16, "trt": TensorProto.INT8, "cpu": TensorProto.INT8}[key]
        assert want in weights, (key, weights)


def test_tensorrt_file_is_symmetric_per_channel_qdq(built: dict[str, Path]) -> None:
    m = onnx.load(str(built["trt"]))
    assert check_tensorrt_qdq(m) == []
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    n_weight_dq = 0
    for node in m.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert np.all(inits[node.input[1]] > 0), node.name
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any(), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert axis == 0 and inits[node.input[1]].size == inits[node.input[0]].shape[0]
            n_weight_dq += 1
    assert n_weight_dq >= 1
    # The head stays float: the logit conv reads float weights, sigmoid/pool/reduce untouched.
    assert _conv_weights(m) == {"input": "DequantizeLinear", "feature": "DequantizeLinear", "head": "float"}
    assert len(quantized_weight_layers(m)) == 2


def test_cpu_file_is_u8s8(built: dict[str, Path]) -> None:
    m = onnx.load(str(built["cpu"]))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(inits[n.input[2]].dtype == np.uint8 for n in q_nodes)
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weights = [inits[n.input[0]] for n in weight_dq if inits[n.input[0]].ndim == 4]
    assert weights and all(w.dtype == np.int8 for w in weights)
    conv_dq = next(n for n in weight_dq if inits[n.input[0]].ndim == 4)
    assert inits[conv_dq.input[1]].size == inits[conv_dq.input[0]].shape[0]
    assert _conv_weights(m) == {"input": "float", "feature": "DequantizeLinear", "head": "float"}
    assert len(quantized_weight_layers(m)) == 1


def test_cpu_qoperator_variant(built: dict[str, Path], tmp_path: Path) -> None:
    meta = load_for_model(built["fp32"])
    images = load_image_set(built["good"], preprocessor_for(meta), n=None, min_images=4)
    (res,) = quantize_pair(
        built["fp32"], ImageSetReader(images), cpu_out=tmp_path / "q.int8.onnx", cpu_format="qoperator"
    )
    m = onnx.load(str(res.path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    qconv = [n for n in m.graph.node if n.op_type == "QLinearConv"]
    assert qconv, "no QLinearConv in the QOperator artifact"
    x_zp, w, w_scale, w_zp = (inits[qconv[0].input[i]] for i in (2, 3, 4, 5))
    assert x_zp.dtype == np.uint8
    assert w.dtype == np.int8 and w_zp.dtype == np.int8 and w_scale.size == w.shape[0]


def test_only_the_tensorrt_file_has_signed_int8_activations(built: dict[str, Path]) -> None:
    # ONNX Runtime runs that file unfused on CPU (edge.backend): its fused s8s8 kernels
    # gave a constant map on an AVX2-only CPU, and the agreement test below caught it.
    assert has_signed_int8_activations(built["trt"])
    assert not any(has_signed_int8_activations(built[k]) for k in ("cpu", "fp32", "fp16"))


def test_int8_and_fp16_agree_with_fp32(built: dict[str, Path]) -> None:
    folders = [built["good"], built["bad"]]
    labels = np.r_[np.zeros(12), np.ones(12)]
    ref = _scores(built["fp32"], built["fp32"], folders)
    auc_ref = roc_auc(labels, ref)
    assert auc_ref > 0.95  # the task is solvable, so agreement means something
    for key in ("trt", "cpu", "fp16"):
        s = _scores(built[key], built["fp32"], folders)
        assert abs(roc_auc(labels, s) - auc_ref) <= 0.01, key
        assert np.max(np.abs(s - ref)) < (0.002 if key == "fp16" else 0.05), key


def test_conv_transpose_weights_per_channel_on_axis_1(tmp_path: Path) -> None:
    w = np.random.default_rng(0).normal(size=(3, 4, 2, 2)).astype(np.float32)  # [C_in, C_out, k, k]
    w2 = np.random.default_rng(1).normal(size=(1, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ConvTranspose", ["image", "w"], ["up"], strides=[2, 2]),
            helper.make_node("Relu", ["up"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["anomaly_map"]),
            helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
        ],
        "ct",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, 16, 16]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )
    src = tmp_path / "ct.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))

    class Reader(ImageSetReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.i += 1
            return (
                {"image": np.random.default_rng(self.i).random((1, 3, 8, 8), dtype=np.float32)}
                if self.i <= 4
                else None
            )

        def rewind(self) -> None:
            self.i = 0

    (res,) = quantize_pair(src, Reader(), trt_out=tmp_path / "ct.int8.trt.onnx")
    m = onnx.load(str(res.path))
    assert check_tensorrt_qdq(m) == []
    dq = next(
        n
        for n in m.graph.node
        if n.op_type == "DequantizeLinear"
        and n.output[0] in next(c for c in m.graph.node if c.op_type == "ConvTranspose").input[1:2]
    )
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1


def test_head_exclusions_name_the_head(brightness_onnx: Path, tmp_path: Path) -> None:
    m = onnx.load(str(prepare_model(brightness_onnx, tmp_path / "p.onnx")))
    ops = {n.name: n.op_type for n in m.graph.node}
    excluded = head_exclusions(m)
    assert sorted(ops[n] for n in excluded) == ["AveragePool", "Conv", "ReduceMax", "Sigmoid"]
    assert all(reason for reason in excluded.values())


@pytest.mark.slow
def test_tiny_pouta_export_quantizes_cleanly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="exporting POUTA needs the training extra (torch)")
    from pouta.trainer.export import export_onnx
    from pouta.trainer.models import build_model
    from pouta.trainer.models.config import preset_config

    torch.manual_seed(0)
    cfg = preset_config("tiny", height=64, width=64)
    src = tmp_path / "tiny.onnx"
    export_onnx(build_model(cfg), cfg, src, 64, 64, parity_batches=(1,))
    normal = _write_parts(tmp_path / "normal", 10, False, 0)
    meta = load_for_model(src)
    images = load_image_set(normal, preprocessor_for(meta), n=10, min_images=4)
    trt, cpu = quantize_pair(
        src, ImageSetReader(images), tmp_path / "t.int8.trt.onnx", tmp_path / "t.int8.onnx"
    )
    m = onnx.load(str(trt.path))
    assert check_tensorrt_qdq(m) == []
    assert len(quantized_weight_layers(m)) >= 10
    ops = {n.name: n.op_type for n in onnx.load(str(src)).graph.node}
    excluded_ops = sorted({ops[n] for n in trt.excluded if n in ops})
    assert {"Softmax", "AveragePool", "ReduceMax", "Conv"} <= set(excluded_ops)
    # the fixed map blur (4 single-channel convs) is walked through, up to the logit conv
    excluded_convs = [n for n in trt.excluded if ops.get(n) == "Conv"]
    assert len([n for n in excluded_convs if "smoothing" in n]) == 4
    assert any("fusion" in n for n in excluded_convs)
    # The CPU file also keeps the autoencoder's first conv on the image in float; the
    # TensorRT file quantizes it.
    added = set(cpu.excluded) - set(trt.excluded)
    assert added == set(input_conv_exclusions(onnx.load(str(src)))) - set(trt.excluded)
    assert [ops[n] for n in added] == ["Conv"] and all("/ae/enc.0/" in n for n in added)
    for path, quantized in ((trt.path, True), (cpu.path, False)):
        g = onnx.load(str(path)).graph
        dq_outputs = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        conv = next(n for n in g.node if n.name in added)
        assert (conv.input[1] in dq_outputs) is quantized, path.name
    fp16 = convert_to_fp16(src, tmp_path / "t.fp16.onnx")
    x = np.stack([images.image(i) for i in range(4)])
    ref_map, ref_score = OnnxRuntimeBackend(src).run(x)
    for path in (trt.path, cpu.path, fp16):
        amap, score = OnnxRuntimeBackend(path, metadata=meta).run(x)
        assert amap.shape == ref_map.shape and score.dtype == np.float32
        assert np.max(np.abs(score - ref_score)) < 0.05, path.name


@pytest.mark.parametrize("kind", ["pouta", "vanilla"])
def test_reconstruction_cue_stays_in_float(tmp_path: Path, kind: str) -> None:
    """The cue (SSIM window, moments, fusion) is walked through up to the autoencoder's
    last conv: nothing of it is quantized, and INT8 scores stay near FP32's."""
    torch = pytest.importorskip("torch", reason="exporting a model needs the training extra (torch)")
    from pouta.trainer.export import export_onnx
    from pouta.trainer.models import build_model, fit_cue_scales
    from pouta.trainer.models.config import preset_config

    torch.manual_seed(0)
    model = build_model(preset_config("tiny", kind, height=H, width=W)).eval()
    fit_cue_scales(model, [torch.rand(4, 3, H, W) * 0.5 + 0.3])
    src = tmp_path / "cue.onnx"
    export_onnx(model, model.cfg, src, H, W)
    prepared = onnx.load(str(prepare_model(src, tmp_path / "p.onnx")))
    excluded = head_exclusions(prepared)
    cue_nodes = [
        n
        for n in prepared.graph.node
        if n.name.startswith("/model/cues/") and n.op_type not in ("Shape", "ConstantOfShape")
    ]
    assert cue_nodes and [n.name for n in cue_nodes if n.name not in excluded] == []
    ssim_window = [n for n in cue_nodes if n.op_type == "Conv" and "smoothing" not in n.name]
    assert len(ssim_window) == 2  # the row and column pass over the stacked moments
    normal = _write_parts(tmp_path / "normal", 10, False, 0)
    meta = load_for_model(src)
    images = load_image_set(normal, preprocessor_for(meta), n=10, min_images=4)
    (cpu,) = quantize_pair(src, ImageSetReader(images), cpu_out=tmp_path / "cue.int8.onnx")
    quantized_inputs = {
        i for n in onnx.load(str(cpu.path)).graph.node if n.op_type == "DequantizeLinear" for i in n.output
    }
    assert not any(i in quantized_inputs for n in cue_nodes for i in n.input)
    x = np.stack([images.image(i) for i in range(4)])
    _, ref = OnnxRuntimeBackend(src).run(x)
    _, got = OnnxRuntimeBackend(cpu.path, metadata=meta).run(x)
    assert np.max(np.abs(got - ref)) < 0.05
