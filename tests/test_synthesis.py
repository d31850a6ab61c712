"""Anomaly synthesis: masks, blends, determinism, texture sources, TrainingSet."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.geometry import Tiling
from pouta.edge.contract.preprocess import Preprocessor
from pouta.trainer.synthesis.anomalies import AnomalySynthesizer, SynthesisConfig, perlin_noise

H, W = 48, 64


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((H, W, 3), dtype=np.float32) * 0.5 + 0.25


@pytest.fixture(scope="module")
def synth() -> AnomalySynthesizer:
    return AnomalySynthesizer(SynthesisConfig(), H, W)


def test_perlin_noise_is_smooth_and_any_size() -> None:
    n = perlin_noise((37, 50), (4, 8), np.random.default_rng(0))
    assert n.shape == (37, 50) and n.dtype == np.float32
    assert -1.5 < n.min() < 0 < n.max() < 1.5
    # lattice corners are zeros of gradient noise
    assert abs(n[0, 0]) < 1e-6
    # neighbouring pixels differ far less than the overall range (it is noise, not white noise)
    assert np.abs(np.diff(n, axis=1)).mean() < 0.1 * (n.max() - n.min())


def test_anomalous_samples(synth: AnomalySynthesizer) -> None:
    img = _image()
    seen = 0
    for k in range(12):
        aug, mask, has = synth(img, np.random.default_rng([7, k]), force_anomaly=True)
        assert has and aug.shape == (H, W, 3) and aug.dtype == np.float32
        assert mask.shape == (H, W) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0
        assert aug.min() >= 0.0 and aug.max() <= 1.0
        outside = mask == 0
        np.testing.assert_allclose(aug[outside], img[outside], atol=1e-6)
        seen += int(np.abs(aug[~outside] - img[~outside]).max() > 1e-3)
    assert seen >= 10  # the masked region really changes


def test_normal_samples_are_untouched(synth: AnomalySynthesizer) -> None:
    img = _image(1)
    for k in range(6):
        aug, mask, has = synth(img, np.random.default_rng(k), force_anomaly=False)
        assert not has and not mask.any()
        np.testing.assert_array_equal(aug, img)


def test_anomaly_share_follows_config() -> None:
    img = _image()
    for prob, lo, hi in ((0.0, 0, 0), (1.0, 40, 40), (0.5, 10, 30)):
        s = AnomalySynthesizer(SynthesisConfig(anomaly_prob=prob, n_augment=1), H, W)
        n = sum(s(img, np.random.default_rng([3, k]))[2] for k in range(40))
        assert lo <= n <= hi, (prob, n)


def test_deterministic_under_rng(synth: AnomalySynthesizer) -> None:
    img = _image()
    a1, m1, h1 = synth(img, np.random.default_rng([1, 2, 3]))
    a2, m2, h2 = synth(img, np.random.default_rng([1, 2, 3]))
    assert h1 == h2
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(m1, m2)
    masks = {synth(img, np.random.default_rng([9, k]), force_anomaly=True)[1].tobytes() for k in range(4)}
    assert len(masks) == 4


def test_mask_is_never_empty_even_for_a_high_threshold() -> None:
    s = AnomalySynthesizer(SynthesisConfig(threshold=5.0, n_augment=1), H, W)
    _, mask, has = s(_image(), np.random.default_rng(0), force_anomaly=True)
    assert has and mask.sum() > 0


def test_texture_folder_source(tmp_path: Path) -> None:
    # DTD layout: images/<class>/*.jpg, found recursively; a pure-red texture so its
    # colour shows up inside the mask.
    folder = tmp_path / "dtd" / "images" / "red"
    folder.mkdir(parents=True)
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk
    cv2.imwrite(str(folder / "r.png"), red)
    (folder / "readme.txt").write_text("x")
    cfg = SynthesisConfig(texture_dir=str(tmp_path / "dtd"), n_augment=1, fuse_prob=0.0, beta_max=0.01)
    s = AnomalySynthesizer(cfg, H, W)
    assert len(s.textures) == 1
    gray = np.full((H, W, 3), 0.5, np.float32)
    reds = 0
    for k in range(8):
        aug, mask, _ = s(gray, np.random.default_rng(k), force_anomaly=True, force_mode="perlin")
        inside = aug[mask > 0]
        reds += int(inside[:, 0].mean() > inside[:, 2].mean() + 0.2)
    # one augmentation of 10 may change the hue/invert, most keep the red
    assert reds >= 4

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        AnomalySynthesizer(SynthesisConfig(texture_dir=str(empty)), H, W)
    with pytest.raises(ConfigError, match="not a folder"):
        AnomalySynthesizer(SynthesisConfig(texture_dir=str(tmp_path / "missing")), H, W)


def test_save_grid_writes_png(tmp_path: Path, synth: AnomalySynthesizer) -> None:
    out = synth.save_grid([_image(0), _image(1).transpose(2, 0, 1)], tmp_path / "sub" / "grid.png", n=6)
    assert out.is_file()
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape[0] >= 2 * H and grid.shape[1] >= 3 * 2 * W


def test_training_set_is_a_pure_function_of_seed_epoch_index(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from pouta.trainer.data.training_set import MIN_SAMPLES_PER_EPOCH, TrainingSet

    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((30, 30, 3), 60 * i, np.uint8))
        paths.append(p)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    pre = Preprocessor(H, W)
    synth = AnomalySynthesizer(SynthesisConfig(anomaly_prob=1.0), H, W)
    with pytest.warns(UserWarning, match="broken.png"):
        ts = TrainingSet([*paths, broken], pre, synth, seed=5)
    assert isinstance(ts, torch.utils.data.Dataset) and len(ts.paths) == 4
    # Small sets make longer epochs (fewer worker restarts); sample i uses image i mod n.
    assert len(ts) == MIN_SAMPLES_PER_EPOCH
    assert torch.equal(ts[6]["original"], ts[2]["original"])
    item = ts[2]
    assert item["image"].shape == (3, H, W) and item["original"].shape == (3, H, W)
    assert item["mask"].shape == (1, H, W) and item["has_anomaly"].shape == ()
    assert float(item["has_anomaly"]) == 1.0 and item["mask"].sum() > 0
    assert torch.allclose(item["original"][0], torch.full((H, W), 120 / 255))

    again = TrainingSet(paths, pre, synth, seed=5)[2]
    assert all(torch.equal(item[k], again[k]) for k in item)
    ts.set_epoch(1)
    assert not torch.equal(ts[2]["mask"], item["mask"])
    ts.set_epoch(0)
    assert torch.equal(ts[2]["mask"], item["mask"])


def _textured(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((H, W)).astype(np.float32), (0, 0), 2)
    return np.repeat(((base - base.min()) / np.ptp(base) * 0.6 + 0.2)[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode", ["stroke", "spot", "uneven", "cutpaste"])
def test_line_defect_modes_change_only_the_labelled_pixels(mode: str) -> None:
    s = AnomalySynthesizer(SynthesisConfig(), H, W)
    # A textured part, and one with a saturated white half (a glare, a fabric border):
    # a defect "brightened" there would leave the pixels unchanged yet be labelled.
    glare = _textured()
    glare[:, : W // 2] = 1.0
    for img in (_textured(), glare):
        for k in range(12):
            aug, mask, has = s(img, np.random.default_rng([k, 7]), force_anomaly=True, force_mode=mode)
            assert has and mask.any() and set(np.unique(mask)) <= {0.0, 1.0}
            np.testing.assert_array_equal(aug[mask == 0], img[mask == 0])
            # Every labelled pixel changed by at least a grey level.
            assert np.abs(aug - img).max(axis=-1)[mask > 0].min() > 1.0 / 255.0


def test_stroke_and_spot_are_thin_or_small_uneven_is_large() -> None:
    s = AnomalySynthesizer(SynthesisConfig(), 128, 128)
    img = cv2.resize(_textured(1), (128, 128))
    for k in range(10):
        rng = np.random.default_rng([k, 3])
        _, stroke, _ = s(img, rng, force_anomaly=True, force_mode="stroke")
        # 1-6 px strokes plus their soft edge: nearly every pixel lies within 4 px of the
        # background (crossings and sharp turns of a crack may be thicker).
        dist = cv2.distanceTransform((stroke > 0).astype(np.uint8), cv2.DIST_L2, 3)
        assert (dist[stroke > 0] <= 4.0).mean() >= 0.9
        _, spot, _ = s(img, np.random.default_rng([k, 4]), force_anomaly=True, force_mode="spot")
        _, _, stats, _ = cv2.connectedComponentsWithStats((spot > 0).astype(np.uint8))
        assert stats[1:, cv2.CC_STAT_AREA].max() <= 200  # pits, not blobs
        _, uneven, _ = s(img, np.random.default_rng([k, 5]), force_anomaly=True, force_mode="uneven")
        assert uneven.mean() > 0.03  # a large area


def test_modes_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"synthesis\.modes\.scratchy: unknown mode"):
        SynthesisConfig(modes={"scratchy": 1.0}).validate()
    with pytest.raises(ConfigError, match="synthesis.modes"):
        SynthesisConfig(modes={"perlin": 0.0, "stroke": 0.0}).validate()
    # Only one mode on: every anomalous sample is made by it.
    s = AnomalySynthesizer(SynthesisConfig(modes={"spot": 1.0}), H, W)
    assert {s.pick_mode(np.random.default_rng(k)) for k in range(20)} == {"spot"}


def test_grids_show_exactly_what_each_mode_makes(tmp_path: Path) -> None:
    """Each cell of synthesis_<mode>.png is the augmented image and its mask for that mode,
    as the synthesizer makes them with the grid's seed: the grid shows what training is taught."""
    s = AnomalySynthesizer(SynthesisConfig(), H, W)
    img = _textured()
    pad, seed, n = 4, 7, 4
    for mode in ("perlin", "stroke", "spot", "uneven", "cutpaste"):
        p = s.save_grid([img], tmp_path / f"synthesis_{mode}.png", seed=seed, n=n, mode=mode)
        grid = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        assert grid.shape == (H + 2 * pad, n * (2 * W + 2 + pad) + pad, 3), mode
        for k in range(n):
            aug, mask, has = s(img, np.random.default_rng([seed, k]), force_anomaly=True, force_mode=mode)
            assert has and mask.max() > 0, (mode, k)
            x = pad + k * (2 * W + 2 + pad)
            cell = grid[pad : pad + H, x : x + 2 * W + 2]
            assert np.abs(cell[:, :W] - aug).max() <= 1 / 255 + 1e-6, (mode, k)
            assert np.abs(cell[:, W + 2 :, 0] - mask).max() <= 1 / 255 + 1e-6, (mode, k)


def test_tiled_training_set_gives_random_crops_of_the_work_image(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from pouta.trainer.data.training_set import TrainingSet

    # A tall 16-bit grayscale image with a horizontal ramp: a crop's values say where it lies.
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (500, 1))
    cv2.imwrite(str(tmp_path / "tall.png"), ramp)
    pre = Preprocessor(H, W, tiling=Tiling(0.5))
    ts = TrainingSet([tmp_path / "tall.png"], pre, AnomalySynthesizer(SynthesisConfig(), H, W), seed=1)
    assert ts.originals[0].shape == (250, 100, 3) and ts.originals[0].dtype == np.uint16
    crops = [ts[i]["original"] for i in range(6)]
    assert all(c.shape == (3, H, W) for c in crops)
    starts = {round(float(c[0, 0, 0]) * 99) for c in crops}
    assert len(starts) > 1  # crops at different places
    assert torch.equal(ts[3]["original"], crops[3])  # and reproducible
