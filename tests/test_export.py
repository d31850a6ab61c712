"""ONNX export: the contract, parity with PyTorch, the metadata sidecar, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pouta.edge.contract.fsutil import sha256_file
from pouta.edge.contract.metadata import ModelMetadata, check_io, metadata_path
from pouta.trainer.checkpoint import save_checkpoint
from pouta.trainer.export import export_onnx
from pouta.trainer.export import main as export_main
from pouta.trainer.models import build_model, fit_cue_scales, preset_config

torch.set_num_threads(2)
H, W = 32, 48


def _trained_like(kind: str, variant: str = "full") -> tuple[torch.nn.Module, object]:
    """A model whose BatchNorm statistics are not the identity, so eval mode matters."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", kind, variant, height=H, width=W)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, H, W) * 0.5 + 0.3)
    return model.eval(), cfg


@pytest.mark.parametrize("kind", ["pouta", "vanilla"])
def test_export_keeps_a_map_blurred_per_axis(tmp_path: Path, kind: str) -> None:
    model, _ = _trained_like(kind)
    fit_cue_scales(model, [torch.rand(4, 3, H, W) * 0.5 + 0.3])
    part_cfg = model.cfg.with_(map_sigma_hw=(4.0, 0.5))
    part = build_model(part_cfg).eval()
    part.load_state_dict(model.state_dict())
    path = tmp_path / "model.onnx"
    rep = export_onnx(part, part_cfg, path, H, W)
    assert rep["max_abs_diff_map"] <= 1e-4 and rep["max_abs_diff_score"] <= 1e-4
    assert ModelMetadata.load(metadata_path(path)).model_config["map_sigma_hw"] == [4.0, 0.5]
    # the score is the round-blurred model's; the map is not
    x = np.random.default_rng(1).random((2, 3, H, W), dtype=np.float32)
    got_map, got_score = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )
    with torch.no_grad():
        ref = model(torch.from_numpy(x), aux=False)
    np.testing.assert_allclose(got_score, ref.score.numpy(), atol=1e-5)
    assert float(np.abs(got_map - ref.anomaly_map.numpy()).max()) > 1e-3


@pytest.mark.parametrize("fitted", [False, True], ids=["disc-map", "with-reconstruction-cue"])
@pytest.mark.parametrize(("kind", "variant"), [("pouta", "full"), ("vanilla", "full")])
def test_export_contract_and_parity(tmp_path: Path, kind: str, variant: str, fitted: bool) -> None:
    model, cfg = _trained_like(kind, variant)
    if fitted:  # what pouta-train hands over: cue scales measured on normal inputs
        fit_cue_scales(model, [torch.rand(4, 3, H, W) * 0.5 + 0.3])
        cfg = model.cfg
    path = tmp_path / "model.onnx"
    rep = export_onnx(model, cfg, path, H, W, checkpoint_sha256="abc", training_info={"steps": 3})
    assert rep["max_abs_diff_map"] <= 1e-4 and rep["max_abs_diff_score"] <= 1e-4

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["anomaly_map", "score"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    # Only the inference path is in the graph: every Conv2d except MSS heads / POUTA image head.
    # With the reconstruction cue POUTA's graph needs the image head too.
    skipped = (
        ("mss_heads",)
        if kind == "pouta" and fitted
        else ("mss_heads", "ae.image_head")
        if kind == "pouta"
        else ()
    )
    n_conv = sum(
        isinstance(m, torch.nn.Conv2d) and not any(s in name for s in skipped)
        for name, m in model.named_modules()
    )
    # MapSmoothing adds 4 functional convs: a separable blur of the map and of the ones-image.
    # The reconstruction cue is smoothed the same way (4 more), and its SSIM window is a
    # row and a column pass over the stacked local moments (2 more).
    n_conv += (4 if cfg.map_sigma > 0 else 0) * (2 if fitted else 1) + (2 if fitted else 0)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == n_conv

    meta = ModelMetadata.load(metadata_path(path))
    assert meta.model_kind == kind and meta.input.height == H and meta.input.width == W
    assert meta.precision == "fp32" and meta.thresholds is None
    assert meta.artifact_sha256 == sha256_file(path) and meta.source_checkpoint_sha256 == "abc"
    assert meta.training == {"steps": 3} and meta.model_config["ae_widths"] == list(cfg.ae_widths)
    assert meta.model_config["cue_scales"] == (list(cfg.cue_scales) if fitted else None)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_io(meta, tuple(sess.get_inputs()[0].shape), [o.name for o in sess.get_outputs()], str(path))

    x = np.random.default_rng(0).random((3, 3, H, W), dtype=np.float32)
    amap, score = sess.run(None, {"image": x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    assert amap.shape == (3, 1, H, W) and score.shape == (3,)
    np.testing.assert_allclose(amap, ref.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(score, ref.score.numpy(), atol=1e-4)


def test_export_cli_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, cfg = _trained_like("pouta", "base")
    ck = save_checkpoint(tmp_path / "model.pt", model, cfg, step=5, info={"status": "done"})
    out = tmp_path / "out" / "m.onnx"
    export_main([str(ck), "-o", str(out), "--size", "64x32"])
    assert "max abs diff" in capsys.readouterr().out
    meta = ModelMetadata.load(metadata_path(out))
    assert (meta.input.height, meta.input.width) == (64, 32)
    assert meta.variant == "base" and meta.source_checkpoint_sha256 == sha256_file(ck)
    assert meta.training["step"] == 5 and meta.training["trained_size"] == [H, W]


def test_export_cli_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="missing.pt: checkpoint not found"):
        export_main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")])
    model, cfg = _trained_like("pouta")
    ck = save_checkpoint(tmp_path / "model.pt", model, cfg)
    with pytest.raises(SystemExit, match="50x64"):
        export_main([str(ck), "-o", str(tmp_path / "m.onnx"), "--size", "50x64"])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind", ["pouta", "vanilla"])
def test_fp16_conversion_runs_a_model_with_the_reconstruction_cue(tmp_path: Path, kind: str) -> None:
    from pouta.calibration.artifacts.fp16 import convert_to_fp16

    model, _ = _trained_like(kind)
    fit_cue_scales(model, [torch.rand(4, 3, H, W) * 0.5 + 0.3])
    path = tmp_path / "model.onnx"
    export_onnx(model, model.cfg, path, H, W)
    fp16 = convert_to_fp16(path, tmp_path / "model.fp16.onnx")
    x = np.random.default_rng(1).random((2, 3, H, W), dtype=np.float32)
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    half = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert half[0].dtype == np.float32 and half[1].shape == (2,)
    np.testing.assert_allclose(half[0], full[0], atol=2e-2)
    np.testing.assert_allclose(half[1], full[1], atol=2e-2)
