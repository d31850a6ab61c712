"""ReDi (``--kind redi``): the HOG map against a reference written from its definition, the
gallery retrieval (torch and the exported ONNX graph agree), HIP hiding the input, the
ablation flags, and train -> export -> ``pouta-eval`` / ``pouta-edge run`` agreeing."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pouta.edge.contract.errors import ConfigError
from pouta.trainer.models import build_model, preset_config
from pouta.trainer.models.redi import (
    HOGMap,
    ReDi,
    SobelGradients,
    gallery_pick,
    global_descriptor,
    train_window,
)

torch.set_num_threads(2)
SIZE = 64


def _cfg(**kw: object):
    return preset_config("tiny", kind="redi", height=SIZE, width=SIZE, redi_gallery=4, redi_width=8, **kw)


def _ramp(angle: float, size: int = SIZE, rise: float = 0.4) -> np.ndarray:
    """Grey ramp whose intensity grows along ``angle`` (radians, x right, y down). [3,H,W]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    v = 0.5 + rise * ((xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)) / size
    return np.repeat(v[None], 3, axis=0).astype(np.float32)


def _reference_histogram(img: np.ndarray, bins: int, cell: int) -> np.ndarray:
    """HOG cells from the definition: Sobel (/8) on the interior, unsigned orientation
    atan2(gy, gx) mod pi, magnitude voted into the nearest of ``bins`` bins. [bins,h,w]."""
    g = img.mean(0) if img.ndim == 3 else img
    h, w = g.shape
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    p = g
    gx[1:-1, 1:-1] = (
        (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    ) / 8
    gy[1:-1, 1:-1] = (
        (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    ) / 8
    mag = np.hypot(gx, gy)
    theta = np.mod(np.arctan2(gy, gx), np.pi)
    b = np.round(theta / (np.pi / bins)).astype(int) % bins
    hist = np.zeros((bins, h // cell, w // cell))
    for y in range(h):
        for x in range(w):
            hist[b[y, x], y // cell, x // cell] += mag[y, x]
    return hist


@pytest.mark.parametrize("degrees", [0, 20, 45, 80, 100, 135, 165])
def test_hog_orientation_lands_in_the_bin_of_the_reference(degrees: int) -> None:
    hog = HOGMap(bins=9)
    img = _ramp(math.radians(degrees))
    ref = _reference_histogram(img, 9, 8)
    x = torch.from_numpy(img)[None]
    with torch.no_grad():
        cells = torch.nn.functional.avg_pool2d(hog.votes(x), 8)[0].numpy()
        g = SobelGradients()(x)[0].numpy()
    # the same gradients as the reference (grey of a grey image, Sobel / 8, zero border)
    assert np.allclose(g[0, 1:-1, 1:-1], 0.4 / SIZE * math.cos(math.radians(degrees)), atol=1e-5)
    assert np.allclose(g[1, 1:-1, 1:-1], 0.4 / SIZE * math.sin(math.radians(degrees)), atol=1e-5)
    assert np.abs(g[:, 0]).max() == 0 and np.abs(g[:, :, -1]).max() == 0
    # every interior cell votes most for the reference's bin
    inner = (slice(1, -1), slice(1, -1))
    ref_bin = ref.argmax(0)[inner]
    assert (cells.argmax(0)[inner] == ref_bin).all(), (degrees, cells.argmax(0)[inner], ref_bin)
    expected = round((degrees % 180) / 20) % 9
    assert (ref_bin == expected).all()


def test_hog_soft_vote_is_the_magnitude_at_a_bin_centre_and_small_elsewhere() -> None:
    hog = HOGMap(bins=9)
    x = torch.from_numpy(_ramp(math.radians(40.0), rise=0.9))[None]  # exactly bin 2
    with torch.no_grad():
        v = hog.votes(x)[0, :, 10, 10]
    magnitude = 0.9 / SIZE
    # within 1 %: the |g|^2 floor (GRADIENT_EPS) weighs this weak gradient slightly less
    assert abs(float(v[2]) - magnitude) < 1e-2 * magnitude
    assert float(v[1]) < 0.15 * magnitude and float(v[3]) < 0.15 * magnitude
    assert float(v[[0, 4, 5, 6, 7, 8]].max()) < 1e-3 * magnitude


def _grating(amplitude: float, period: int = 16) -> np.ndarray:
    """Stripes across x (strong gradients, orientation 0). [3,H,W]."""
    xx = np.mgrid[0:SIZE, 0:SIZE][1].astype(np.float64)
    v = 0.5 + amplitude * np.sin(2 * np.pi * xx / period)
    return np.repeat(v[None], 3, axis=0).astype(np.float32)


def test_hog_map_is_dense_contrast_normalised_and_zero_on_a_flat_image() -> None:
    hog = HOGMap(bins=9)
    with torch.no_grad():
        flat = hog(torch.full((1, 3, SIZE, SIZE), 0.5))
        strong = hog(torch.from_numpy(_grating(0.4))[None])
        faint = hog(torch.from_numpy(_grating(0.2))[None])
    assert tuple(flat.shape) == (1, 9, SIZE, SIZE)
    assert float(flat.abs().max()) < 1e-3
    # block-normalised: an interior cell has norm about 1 and half the contrast barely moves it
    assert 0.9 < float(strong[0, :, 32, 32].norm()) < 1.1
    assert float((strong - faint)[..., 8:-8, 8:-8].abs().max()) < 0.05
    assert int(strong[0, :, 32, 32].argmax()) == 0


def test_shapes_range_and_config_errors() -> None:
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, SIZE, SIZE))
    assert tuple(out.anomaly_map.shape) == (2, 1, SIZE, SIZE) and tuple(out.score.shape) == (2,)
    assert float(out.anomaly_map.min()) >= 0.0 and float(out.anomaly_map.max()) <= 1.0
    assert out.reconstruction is not None and tuple(out.reconstruction.shape) == (2, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="model.redi_structure: expected one of"):
        _cfg(redi_structure="canny")
    with pytest.raises(ConfigError, match="model.redi_hip: expected true or false"):
        _cfg(redi_hip="no")
    with pytest.raises(ConfigError, match="multiples of 32"):
        preset_config("tiny", kind="redi", height=48, width=64)


def test_gallery_pick_covers_every_pose_and_training_never_retrieves_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1)
    sizes = [60, 20, 5, 1]  # a rare pose must still get a prompt
    descs = torch.nn.functional.normalize(
        torch.cat(
            [c + 0.01 * torch.randn(n, 16, generator=gen) for c, n in zip(centres, sizes, strict=True)]
        ),
        dim=1,
    )
    pick = gallery_pick(descs, 4, seed=0)
    assert sorted((descs[pick] @ centres.t()).argmax(1).tolist()) == [0, 1, 2, 3]
    assert len(gallery_pick(descs[:2], 4, seed=0)) == 4  # fewer images: repeated, fixed shape
    model = build_model(_cfg())
    imgs = torch.rand(4, 3, SIZE, SIZE, generator=gen)
    model.fit_before_training([imgs], seed=0)
    with torch.no_grad():
        q = global_descriptor(model.backbone(model.gallery.images)["s16"])
    _, at_inference = model.gallery.retrieve(q)
    _, in_training = model.gallery.retrieve(q, exclude_self=True)
    assert at_inference.tolist() == [0, 1, 2, 3]  # a member is its own nearest
    assert all(i != j for i, j in enumerate(in_training.tolist()))


def _capture_recover_input(model: ReDi, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen: list[torch.Tensor] = []
    handle = model.recover.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert out.reconstruction is not None
    return seen[0], out.reconstruction


def test_hip_hides_the_input_from_the_recover_network() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    gallery = torch.rand(4, 3, SIZE, SIZE)
    model.fit_before_training([gallery], seed=0)
    x = torch.rand(1, 3, SIZE, SIZE) * 0.6 + 0.2
    seen, _ = _capture_recover_input(model, x)
    # the recover network sees the structure map and a gallery image, not the pixels of x
    assert seen.shape[1] == 9 + 3
    assert torch.allclose(seen[:, :9], model.structure(x))
    assert any(torch.equal(seen[0, 9:], g) for g in model.gallery.images)
    # the same part under another exposure (+0.1: the same gradients, other pixels): the
    # prompt keeps the structure map (exposure is not structure) and the recovery is the
    # same image; the raw-image ablation copies the new pixels through.
    model.gallery.fill(gallery[:1].repeat(4, 1, 1, 1), model.gallery.descriptors)
    s0, y0 = _capture_recover_input(model, x)
    s1, y1 = _capture_recover_input(model, x + 0.1)
    assert float((s0 - s1).abs().max()) < 1e-5 and float((y0 - y1).abs().max()) < 1e-5
    raw = build_model(_cfg(redi_hip=False)).eval()
    r0, _ = _capture_recover_input(raw, x)
    r1, _ = _capture_recover_input(raw, x + 0.1)
    assert torch.equal(r0, x) and torch.allclose(r1 - r0, torch.full_like(x, 0.1), atol=1e-6)


def test_ablation_flags_change_the_graph_and_the_loss() -> None:
    full = build_model(_cfg())
    assert full.recover.down[0][0][0].in_channels == 12 and full.frb is not None
    assert build_model(_cfg(redi_hip=False)).recover.down[0][0][0].in_channels == 3
    assert build_model(_cfg(redi_structure="edges")).recover.down[0][0][0].in_channels == 4
    no_frb = build_model(_cfg(redi_frb=False))
    assert no_frb.frb is None and not any("frb" in n for n, _ in no_frb.named_parameters())
    x = torch.rand(2, 3, SIZE, SIZE)
    full.fit_before_training([x], seed=0)
    full.train()
    assert set(full.training_loss(x, x, x[:, :1]).as_floats()) == {"total", "mse", "ssim", "l_d", "l_s"}
    no_ls = build_model(_cfg(redi_self_correlation=False)).train()
    assert "l_s" not in no_ls.training_loss(x, x, x[:, :1]).as_floats()


def test_training_recovers_windows_of_the_whole_input_prompt() -> None:
    x = torch.rand(2, 3, 128, 96)
    assert train_window(x, 0) is None and train_window(x[..., :64, :64], 128) is None
    torch.manual_seed(0)
    corners = {(w.top, w.left, w.height, w.width) for w in (train_window(x, 64) for _ in range(60))}
    assert {c[:2] for c in corners} == {(t, c) for t in (0, 32, 64) for c in (0, 32)}
    assert {c[2:] for c in corners} == {(64, 64)}
    cfg = preset_config(
        "tiny", kind="redi", height=128, width=96, redi_gallery=2, redi_width=8, redi_train_crop=64
    )
    model = build_model(cfg)
    model.fit_before_training([torch.rand(2, 3, 128, 96)], seed=0)
    model.train()
    seen: list[torch.Tensor] = []
    handle = model.recover.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    torch.manual_seed(1)
    window = train_window(x, 64)
    torch.manual_seed(1)
    loss = model.training_loss(x, x, x[:, :1])
    handle.remove()
    assert window is not None and torch.isfinite(loss.total)
    with torch.no_grad():
        whole = model.recover_input(x, global_descriptor(model.backbone(x)["s16"]))
    # the structure map and the prompt of the whole input, cut to the window (not of the crop)
    assert seen[0].shape[-2:] == (64, 64) and torch.allclose(seen[0], window.of(whole))
    with pytest.raises(ConfigError, match="model.redi_train_crop: expected 0"):
        _cfg(redi_train_crop=100)


def test_discriminative_loss_reaches_the_recover_network_through_the_frozen_backbone() -> None:
    model = build_model(_cfg(redi_frb=False))
    x = torch.rand(2, 3, SIZE, SIZE)
    model.fit_before_training([x], seed=0)
    model.train()
    f_x, _, f_y = model.branches(x)
    l_d = sum(1 - torch.nn.functional.cosine_similarity(f_x[t], f_y[t], dim=1).mean() for t in f_x)
    l_d.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert float(model.recover.out.weight.grad.abs().sum()) > 0


@pytest.mark.slow
def test_retrieval_picks_the_same_gallery_image_in_torch_and_onnx_runtime(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from pouta.trainer.export import export_onnx

    torch.manual_seed(0)
    from pouta.trainer.data.demo_data import make_demo_dataset

    cat = make_demo_dataset(tmp_path / "d", n_train=12, n_test_good=2, n_test_defect=2, size=SIZE)
    imgs = torch.from_numpy(np.stack([_read(p) for p in sorted((cat / "train" / "good").glob("*.png"))]))
    # four visibly different prompts: the demo texture under four exposures
    gallery = torch.stack([imgs[i] * s for i, s in enumerate((0.4, 0.7, 1.0, 1.3))]).clamp(0, 1)
    model = build_model(_cfg()).eval()
    model.fit_before_training([gallery], seed=0)
    queries = torch.cat([(imgs[4:12] * s).clamp(0, 1) for s in (0.45, 0.75, 1.05, 1.25)])
    with torch.no_grad():
        q = global_descriptor(model.backbone(queries)["s16"])
        _, want = model.gallery.retrieve(q)
    assert len(set(want.tolist())) >= 3  # the check is not about one entry
    path = tmp_path / "redi.onnx"
    rep = export_onnx(model, model.cfg, path, SIZE, SIZE)
    assert rep["max_abs_diff_score"] < 1e-4
    graph = onnx.load(str(path))
    argmax = [n for n in graph.graph.node if n.op_type == "ArgMax"]
    assert len(argmax) == 1  # the retrieval is in the deployed graph
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(argmax[0].output[0], onnx.TensorProto.INT64, None)
    )
    probe = tmp_path / "probe.onnx"
    onnx.save(graph, str(probe))
    sess = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    got = sess.run([argmax[0].output[0]], {sess.get_inputs()[0].name: queries.numpy()})[0]
    assert got.reshape(-1).tolist() == want.tolist()


def _read(p: Path) -> np.ndarray:
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32).transpose(2, 0, 1) / 255.0


@pytest.mark.slow
def test_train_export_and_the_runtime_score_like_pouta_eval(tmp_path: Path) -> None:
    from pouta.trainer.data.demo_data import make_demo_dataset

    cat = make_demo_dataset(tmp_path / "d", n_train=16, n_test_good=3, n_test_defect=2, size=SIZE)
    out = tmp_path / "run"
    env_py = sys.executable
    proc = subprocess.run(
        [env_py, "-m", "pouta.trainer.train", "--data", str(cat), "--kind", "redi", "--size", f"{SIZE}x{SIZE}",
         "--steps", "3", "--batch-size", "2", "--set", "model.redi_width=8", "--set", "model.redi_gallery=4",
         "--set", "train.num_workers=0", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distance scale" in proc.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and {"l_d", "l_s", "mse"} <= set(log[-1])
    model_onnx = tmp_path / "redi.onnx"
    for cmd in (
        [env_py, "-m", "pouta.trainer.export", str(out / "model.pt"), "-o", str(model_onnx)],
        [env_py, "-m", "pouta.trainer.evaluate", "--checkpoint", str(out / "model.pt"), "--data", str(cat),
         "--out", str(tmp_path / "eval"), "--no-progress"],
        [env_py, "-m", "pouta.edge.cli", "run", "--images", str(cat / "test"), "--engine", str(model_onnx),
         "--out", str(tmp_path / "edge"), "--quiet", "--set", "postprocess.image_threshold=0.9",
         "--set", "postprocess.pixel_threshold=0.9"],
    ):  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (cmd[2], p.stderr[-2000:])
    meta = json.loads(Path(f"{model_onnx}.json").read_text())
    assert meta["model_kind"] == "redi"
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    torch_scores = {
        Path(r["path"]).name + Path(r["path"]).parent.name: float(r["score"]) for r in report["scores"]
    }
    rows = list(csv.DictReader((tmp_path / "edge" / "results.csv").open()))
    runtime = {Path(r["path"]).name + Path(r["path"]).parent.name: float(r["score"]) for r in rows}
    assert set(runtime) == set(torch_scores) and len(runtime) == 3 + 2 * 3
    diff = max(abs(runtime[k] - torch_scores[k]) for k in runtime)
    assert diff < 1e-4, diff


@pytest.mark.slow
def test_int8_and_fp16_files_keep_the_retrieval_in_float_and_stay_finite(tmp_path: Path) -> None:
    import onnx
    from pouta.calibration.artifacts.fp16 import convert_to_fp16
    from pouta.calibration.artifacts.quantize import prepare_model, quantize_pair
    from pouta.calibration.calibset import ImageSetReader, load_image_set
    from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend
    from pouta.edge.contract.metadata import load_for_model
    from pouta.edge.contract.preprocess import preprocessor_for
    from pouta.trainer.data.demo_data import make_demo_dataset
    from pouta.trainer.export import export_onnx

    torch.manual_seed(0)
    cat = make_demo_dataset(tmp_path / "d", n_train=12, n_test_good=2, n_test_defect=2, size=SIZE)
    good = cat / "train" / "good"
    imgs = torch.from_numpy(np.stack([_read(p) for p in sorted(good.glob("*.png"))]))
    model = build_model(_cfg()).eval()
    model.fit_before_training([imgs[:8]], seed=0)
    model.fit_after_training([imgs[8:]])
    src = tmp_path / "redi.onnx"
    export_onnx(model, model.cfg, src, SIZE, SIZE, parity_batches=(1,))
    prepared = onnx.load(str(prepare_model(src, tmp_path / "p.onnx")))
    producers = {o: n for n in prepared.graph.node for o in n.output}
    argmax = next(n for n in prepared.graph.node if n.op_type == "ArgMax")
    retrieval = producers[argmax.input[0]]
    assert retrieval.op_type in ("MatMul", "Gemm")
    meta = load_for_model(src)
    images = load_image_set(good, preprocessor_for(meta), n=12, min_images=4)
    trt, cpu = quantize_pair(
        src, ImageSetReader(images), tmp_path / "r.int8.trt.onnx", tmp_path / "r.int8.onnx"
    )
    assert retrieval.name in trt.excluded and retrieval.name in cpu.excluded
    fp16 = convert_to_fp16(src, tmp_path / "r.fp16.onnx")
    # real parts and a flat grey frame (zero gradients everywhere: the HOG floor must hold)
    x = np.concatenate(
        [np.stack([images.image(i) for i in range(4)]), np.full((1, 3, SIZE, SIZE), 0.5, np.float32)]
    )
    _, ref_score = OnnxRuntimeBackend(src).run(x)
    for path in (trt.path, cpu.path, fp16):
        amap, score = OnnxRuntimeBackend(path, metadata=meta).run(x)
        assert np.isfinite(amap).all() and np.isfinite(score).all(), path.name
        assert np.max(np.abs(score - ref_score)) < 0.1, (path.name, score, ref_score)
