"""POUTA / vanilla models: shapes, ranges, the score definition, variants, presets' cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pouta.edge.contract.errors import ConfigError
from pouta.trainer.losses import ssim_map
from pouta.trainer.models import (
    POUTA,
    ModelConfig,
    VanillaDRAEM,
    build_model,
    count_params,
    preset_config,
)
from pouta.trainer.models.cost import model_cost
from pouta.trainer.models.layers import MapSmoothing

torch.set_num_threads(2)

VARIANTS = [("pouta", "full"), ("pouta", "base"), ("pouta", "hsg"), ("pouta", "mss"), ("vanilla", "full")]


@pytest.mark.parametrize(("kind", "variant"), VARIANTS)
def test_forward_shapes_and_ranges(kind: str, variant: str) -> None:
    torch.manual_seed(0)
    h, w = 32, 48  # non-square
    model = build_model(preset_config("tiny", kind, variant, height=h, width=w))
    x = torch.rand(2, 3, h, w)
    out = model.train()(x)
    assert out.anomaly_map.shape == (2, 1, h, w)
    assert out.logits.shape == (2, 2, h, w)
    assert out.score.shape == (2,)
    assert out.reconstruction is not None and out.reconstruction.shape == (2, 3, h, w)
    assert float(out.anomaly_map.detach().min()) >= 0.0 and float(out.anomaly_map.detach().max()) <= 1.0
    assert float(out.reconstruction.detach().min()) >= 0.0 and float(out.reconstruction.detach().max()) <= 1.0
    assert torch.allclose(out.anomaly_map, model.smoothing(torch.softmax(out.logits, 1)[:, 1:2]), atol=1e-6)
    with_mss = kind == "pouta" and variant in ("full", "mss")
    assert len(out.side_logits) == (4 if with_mss else 0)
    for s in out.side_logits:
        assert s.shape == (2, 2, h, w)
    # gradients reach the whole network (no dead branch)
    loss = out.logits.square().mean() + out.reconstruction.mean() + sum(s.mean() for s in out.side_logits)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("kind", "variant"), [("pouta", "full"), ("vanilla", "full")])
def test_score_is_21x21_avgpool_max(kind: str, variant: str) -> None:
    torch.manual_seed(1)
    model = build_model(preset_config("tiny", kind, variant, height=48, width=64)).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 48, 64))
    pooled = F.avg_pool2d(out.anomaly_map, 21, stride=1, padding=10, count_include_pad=True)
    assert torch.allclose(out.score, pooled.flatten(1).max(dim=1).values, atol=1e-7)
    # a single hot spot, hand-checked: the 21x21 window covering the centre averages it
    from pouta.trainer.models import image_score

    amap = torch.zeros(1, 1, 48, 64)
    amap[0, 0, 20:25, 30:35] = 1.0
    assert torch.allclose(image_score(amap), torch.tensor([25.0 / 441.0]))


def test_eval_path_skips_training_only_outputs() -> None:
    model = build_model(preset_config("tiny", "pouta", "full", height=32, width=32)).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        full, lean = model(x, aux=True), model(x, aux=False)
    assert lean.side_logits == [] and lean.reconstruction is None
    assert torch.allclose(full.anomaly_map, lean.anomaly_map)


def test_variants_have_the_right_modules() -> None:
    base = build_model(preset_config("tiny", "pouta", "base"))
    full = build_model(preset_config("tiny", "pouta", "full"))
    assert isinstance(base, POUTA) and base.hsg is None and base.mss_heads is None
    assert full.hsg is not None and full.mss_heads is not None and len(full.mss_heads) == 4
    assert isinstance(build_model(preset_config("tiny", "vanilla")), VanillaDRAEM)


def test_bad_sizes_and_fields_are_named() -> None:
    with pytest.raises(ConfigError, match="100x128"):
        preset_config("tiny", height=100, width=128)
    model = build_model(preset_config("tiny", height=32, width=32))
    with pytest.raises(ConfigError, match="40x32"):
        model(torch.rand(1, 3, 40, 32))
    with pytest.raises(ConfigError, match=r"model\.variant"):
        preset_config("tiny", variant="nope")
    with pytest.raises(ConfigError, match="unknown model field"):
        ModelConfig.from_dict({"kind": "pouta", "bogus": 1})


def test_config_json_round_trip() -> None:
    cfg = preset_config("paper", "pouta", "mss", height=224, width=320, mss_head="conv3x3")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert count_params(build_model(again)) == count_params(build_model(cfg))


def test_paper_presets_match_table5() -> None:
    pouta = model_cost(preset_config("paper", "pouta", "full"), 224, 224)
    vanilla = model_cost(preset_config("paper", "vanilla"), 224, 224)
    assert abs(pouta["params"] - 15.02e6) / 15.02e6 < 0.10, pouta["params"]
    assert abs(vanilla["params"] - 28.68e6) / 28.68e6 < 0.10, vanilla["params"]
    assert pouta["flops"] / vanilla["flops"] <= 0.90
    assert pouta["flops"] == 2 * pouta["macs"]
    # the paper's "35.37G FLOPs" are MACs; ours must be in that range
    assert 30e9 < pouta["macs"] < 40e9


def test_map_smoothing_keeps_levels_and_spreads_spikes() -> None:
    blur = MapSmoothing(4.0)
    flat = torch.full((1, 1, 40, 56), 0.7)
    # renormalised at the border: a uniform map stays uniform (no darkened edges)
    assert torch.allclose(blur(flat), flat, atol=1e-6)
    spike = torch.zeros(1, 1, 64, 64)
    spike[0, 0, 32, 32] = 1.0
    out = blur(spike)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-4)  # mass kept away from borders
    assert out.max().item() < 0.02 and out[0, 0, 32, 32] == out.max()
    assert blur.state_dict() == {}  # rebuilt from config, nothing stored in checkpoints


def test_map_sigma_zero_gives_the_raw_softmax() -> None:
    cfg = preset_config("tiny", "pouta", "full", height=32, width=32).with_(map_sigma=0.0)
    model = build_model(cfg).eval()
    assert model.smoothing is None
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert torch.allclose(out.anomaly_map, torch.softmax(out.logits, 1)[:, 1:2])


def test_map_smoothing_per_axis_blurs_each_axis_by_its_own_sigma() -> None:
    spike = torch.zeros(1, 1, 65, 65)
    spike[0, 0, 32, 32] = 1.0
    out = MapSmoothing((4.0, 0.0))(spike)[0, 0]
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-4)
    assert torch.count_nonzero(out[:, 31]) == 0 and torch.count_nonzero(out[:, 33]) == 0  # columns kept
    assert float(out[28, 32]) > 0.01  # rows spread
    both = MapSmoothing((4.0, 1.0))(spike)[0, 0]
    assert float(both[32, 36]) < float(both[36, 32])  # narrower across than down
    assert torch.allclose(MapSmoothing(3.0)(spike), MapSmoothing((3.0, 3.0))(spike))


@pytest.mark.parametrize("kind", ["pouta", "vanilla"])
def test_map_blur_per_axis_changes_the_map_and_keeps_the_score(kind: str) -> None:
    from pouta.trainer.models import fit_cue_scales

    torch.manual_seed(5)
    x = 0.45 + 0.1 * torch.rand(3, 3, 48, 64)
    x[1, :, 20:24, 30:33] = 1.0
    round_model = build_model(preset_config("tiny", kind, "full", height=48, width=64)).eval()
    fit_cue_scales(round_model, [x])
    assert round_model.map_smoothing is None
    part = build_model(round_model.cfg.with_(map_sigma_hw=(4.0, 0.5))).eval()
    part.load_state_dict(round_model.state_dict())
    with torch.no_grad():
        a, b = round_model(x, aux=False), part(x, aux=False)
        # the verdict is unchanged; the map is the same fusion, blurred by the per-axis sigmas
        assert torch.equal(a.score, b.score)
        (k_a, k_r), (w_a, w_r) = part.cfg.cue_scales, part.cfg.cue_weights
        blur = MapSmoothing((4.0, 0.5))
        d = blur(torch.softmax(b.logits, 1)[:, 1:2])
        r = blur((1 - ssim_map(x, b.reconstruction).mean(dim=1, keepdim=True)).clamp_min(0))
        assert torch.allclose(b.anomaly_map, w_a * d / (d + k_a) + w_r * r / (r + k_r), atol=1e-6)
        assert float((a.anomaly_map - b.anomaly_map).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match=r"model.map_sigma_hw: expected null or two numbers in \[0, 32\]"):
        round_model.cfg.with_(map_sigma_hw=(4.0, -1.0))


@pytest.mark.parametrize("kind", ["pouta", "vanilla"])
def test_reconstruction_cue_joins_the_map_once_fitted(kind: str) -> None:
    from pouta.trainer.models import fit_cue_scales, image_score

    torch.manual_seed(3)
    cfg = preset_config("tiny", kind, "full", height=48, width=64)
    assert cfg.reconstruction_cue and cfg.cue_scales is None
    model = build_model(cfg).eval()
    normal = 0.45 + 0.1 * torch.rand(6, 3, 48, 64)
    with torch.no_grad():
        plain = model(normal)  # not fitted yet: the discriminator's map alone
    assert torch.allclose(
        plain.anomaly_map, model.smoothing(torch.softmax(plain.logits, 1)[:, 1:2]), atol=1e-6
    )
    rec_scores = image_score(model.cues.reconstruction_error(normal, plain.reconstruction, model.smoothing))
    scales = fit_cue_scales(model, [normal[:4], normal[4:]])
    assert scales == pytest.approx((float(plain.score.mean()), float(rec_scores.mean())), rel=1e-5)
    assert model.cfg.cue_scales == scales and not model.training
    # each cue's share: its mean over its spread on the good inputs, normalised, within [0.1, 0.9]
    snr_a = float(plain.score.mean() / plain.score.std())
    snr_r = float(rec_scores.mean() / rec_scores.std())
    w_a, w_r = model.cfg.cue_weights
    assert w_a == pytest.approx(min(max(snr_a / (snr_a + snr_r), 0.1), 0.9), rel=1e-4)
    assert w_a + w_r == pytest.approx(1.0)
    assert model.cues.weights == model.cfg.cue_weights
    with torch.no_grad():
        fused = model(normal, aux=False)  # the export path computes the reconstruction too
        k_a, k_r = scales
        a = model.smoothing(torch.softmax(fused.logits, 1)[:, 1:2])
        r = model.cues.reconstruction_error(normal, plain.reconstruction, model.smoothing)
        assert torch.allclose(fused.anomaly_map, w_a * a / (a + k_a) + w_r * r / (r + k_r), atol=1e-6)
        assert torch.allclose(fused.score, image_score(fused.anomaly_map))
        assert float(fused.anomaly_map.min()) >= 0.0 and float(fused.anomaly_map.max()) < 1.0
        # a patch the autoencoder does not reproduce raises the reconstruction cue there only
        hit = normal.clone()
        hit[:, :, 20:28, 30:38] = 1.0
        r_hit = model.cues.reconstruction_error(hit, model(hit).reconstruction, model.smoothing)
    diff = (r_hit - r)[:, 0]
    assert float(diff[:, 20:28, 30:38].mean()) > 10 * float(diff[:, :8, :8].abs().mean())


def test_fitted_cue_scales_survive_a_checkpoint(tmp_path) -> None:
    from pouta.trainer.checkpoint import load_model, save_checkpoint
    from pouta.trainer.models import fit_cue_scales

    torch.manual_seed(4)
    model = build_model(preset_config("tiny", "pouta", "full", height=32, width=32))
    x = torch.rand(3, 3, 32, 32)
    fit_cue_scales(model, [x])
    path = save_checkpoint(tmp_path / "m.pt", model, model.cfg, step=1, train_config={}, info={})
    loaded, cfg, _ = load_model(path)
    assert cfg.cue_scales == model.cfg.cue_scales and cfg.cue_weights == model.cfg.cue_weights
    with torch.no_grad():
        assert torch.allclose(loaded(x).anomaly_map, model(x).anomaly_map, atol=1e-6)


def test_cue_error_measures_and_legacy_configs() -> None:
    from pouta.trainer.models.layers import CueFusion

    torch.manual_seed(6)
    x = 0.3 + 0.4 * torch.rand(2, 3, 40, 40)
    off = x.clone()
    off[:, :, 10:14, 10:30] = 0.05  # a thin dark scratch the reconstruction missed
    for error in ("ssim", "squared"):
        cue = CueFusion((0.5, 0.1), error)
        same = cue.reconstruction_error(x, x, None)
        assert same.shape == (2, 1, 40, 40) and float(same.abs().max()) < 1e-5
        r = cue.reconstruction_error(x, off, None)[:, 0]
        assert float(r.min()) >= 0.0
        assert float(r[:, 10:14, 10:30].mean()) > 20 * float(r[:, 30:, 30:].mean() + 1e-6)
    # a brightness shift moves the squared error everywhere, SSIM much less than a scratch
    ssim_cue = CueFusion((0.5, 0.1), "ssim")
    shifted = ssim_cue.reconstruction_error(x, x + 0.1, None)
    assert float(shifted.mean()) < 0.2 * float(
        ssim_cue.reconstruction_error(x, off, None)[:, 0, 10:14, 10:30].mean()
    )
    with pytest.raises(
        ConfigError, match=r"^model\.cue_error: expected one of \('ssim', 'squared'\), got 'l1'"
    ):
        preset_config("tiny", cue_error="l1")
    # a checkpoint written before the field existed was fitted on the squared error
    legacy = {
        k: v for k, v in preset_config("tiny", cue_scales=(0.5, 0.01)).to_dict().items() if k != "cue_error"
    }
    assert ModelConfig.from_dict(legacy).cue_error == "squared"
    assert ModelConfig.from_dict({**legacy, "cue_scales": None}).cue_error == "ssim"


def test_cue_weights_favour_the_cue_that_is_steady_on_good_parts() -> None:
    from pouta.trainer.models.layers import EQUAL_CUE_WEIGHTS, CueFusion, cue_weights

    # same mean on good parts, the reconstruction error scatters 4x less: it gets 4/5
    w_a, w_r = cue_weights((0.2, 0.1), (0.08, 0.01))
    assert (w_a, w_r) == pytest.approx((0.2, 0.8))
    assert cue_weights((0.2, 0.1), (0.0, 0.01)) == EQUAL_CUE_WEIGHTS  # one good input, or a flat cue
    assert cue_weights((0.5, 0.1), (1e-5, 0.05)) == pytest.approx((0.9, 0.1))  # neither is silenced
    # the weights decide which cue a part's map follows; the map stays in [0, 1]
    x = 0.3 + 0.4 * torch.rand(1, 3, 32, 32)
    off = x.clone()
    off[:, :, 8:12, 4:28] = 0.05
    amap = torch.full((1, 1, 32, 32), 0.05)
    maps = {w: CueFusion((0.05, 0.01), "ssim", w)(amap, x, off, None) for w in ((0.9, 0.1), (0.1, 0.9))}
    assert float(maps[(0.1, 0.9)].max()) > float(maps[(0.9, 0.1)].max()) + 0.3
    assert all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in maps.values())
    # a model fitted before the field existed fuses by halves
    legacy = CueFusion((0.05, 0.01), "ssim")(amap, x, off, None)
    assert torch.allclose(legacy, CueFusion((0.05, 0.01), "ssim", (0.5, 0.5))(amap, x, off, None))
    for bad in (0.5, [0.5], [0.7, 0.7], [-0.1, 1.1], ["a", 1.0]):
        with pytest.raises(
            ConfigError, match=r"^model\.cue_weights: expected null or two numbers in \[0, 1\]"
        ):
            preset_config("tiny", cue_weights=bad)


@pytest.mark.parametrize("bad", [0.1, [0.1], [0.1, 0.0], [0.1, float("nan")], ["a", 1.0]])
def test_cue_scales_must_be_two_positive_numbers(bad: list) -> None:
    with pytest.raises(ConfigError, match=r"^model\.cue_scales: expected null or two positive numbers"):
        preset_config("tiny", "pouta", "full", cue_scales=bad)
