"""Tiled geometry: tiles cover the frame, maps stitch back, the score is the pooled max, and
evaluation, calibration and the runtime agree on a tiled model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.edge.contract.geometry import Tiling, pooled_max, tile_origins
from pouta.edge.contract.metadata import ModelMetadata, metadata_path
from pouta.edge.contract.preprocess import Preprocessor, preprocessor_for
from pouta.trainer.geometry import DataStats, choose_geometry


def test_tile_origins_cover_evenly_with_overlap() -> None:
    assert tile_origins(100, 128, 0.25) == [0]
    xs = tile_origins(4096, 128, 0.25)
    assert xs[0] == 0 and xs[-1] == 4096 - 128
    steps = np.diff(xs)
    assert steps.max() <= 96 and steps.min() >= 90  # at least a quarter of a tile shared, evenly


def test_cut_and_stitch_round_trip_on_a_tall_frame() -> None:
    pre = Preprocessor(64, 64, tiling=Tiling(0.5, 0.25))
    frame = (np.random.default_rng(0).random((1250, 500)) * 255).astype(np.uint8)
    tiles, geo = pre.tiles(frame)
    assert geo.work_hw == (625, 250) and tiles.shape == (geo.n_tiles, 3, 64, 64)
    assert geo.n_tiles == len(tile_origins(625, 64, 0.25)) * len(tile_origins(250, 64, 0.25))
    # Stitching the tiles' own first channel gives the work image back exactly: every
    # overlap is a weighted mean of equal values.
    work = pre(frame)
    np.testing.assert_allclose(geo.stitch(tiles[:, 0]), work[0], atol=1e-6)
    # Back to source pixels: the map covers the frame.
    assert geo.to_source(geo.stitch(tiles[:, 0])).shape == (1250, 500)


def test_frame_smaller_than_a_tile_is_padded_and_cropped_back() -> None:
    pre = Preprocessor(64, 64, tiling=Tiling(1.0))
    tiles, geo = pre.tiles(np.full((40, 200, 3), 90, np.uint8))
    assert tiles.shape[1:] == (3, 64, 64) and geo.work_hw == (40, 200)
    assert geo.stitch(np.ones((geo.n_tiles, 64, 64), np.float32)).shape == (40, 200)


def test_pooled_max_is_the_zero_padded_21x21_average() -> None:
    rng = np.random.default_rng(3)
    m = rng.random((40, 57)).astype(np.float32)
    padded = np.pad(m, 10)
    brute = max(padded[y : y + 21, x : x + 21].mean() for y in range(40) for x in range(57))
    assert pooled_max(m) == pytest.approx(brute, rel=1e-5)


def _stats(h: int, w: int) -> DataStats:
    return DataStats(10, 10, (h, w), (h, w), (h, w), (1,), ("uint8",))


def test_automatic_geometry_rules() -> None:
    # Small images, and those a whole-image input shrinks at most 2x: one input, as before.
    g = choose_geometry(_stats(128, 128), (128, 128), "auto")
    assert g.tiling is None and (g.height, g.width) == (128, 128)
    g = choose_geometry(_stats(256, 256), (128, 128), "auto")
    assert g.tiling is None and g.downscale == 2.0
    # Near-square images stay whole however large; the warning names the scale tiles would use.
    g = choose_geometry(_stats(900, 900), (128, 128), "auto")
    assert g.tiling is None and g.downscale == pytest.approx(900 / 128)
    assert "--tile-scale 0.284" in (g.small_defect_warning() or "")
    g = choose_geometry(_stats(300, 560), (128, 128), "auto")  # aspect 1.87: still whole
    assert g.tiling is None
    g = choose_geometry(_stats(300, 600), (128, 128), "auto")  # aspect 2, 4.7x: tiled at 256/300
    assert g.tiling is not None and round(300 * g.tiling.scale) == 256
    g = choose_geometry(_stats(128, 256), (128, 128), "auto")  # elongated but only 2x: whole
    assert g.tiling is None
    # A fabric web 256 x 4096 would need 129 tiles at native scale: whole, with the hint.
    g = choose_geometry(_stats(256, 4096), (128, 128), "auto")
    assert g.tiling is None and "--tile-scale 1 " in (g.small_defect_warning() or "")
    assert g.axis_downscale == (2.0, 32.0) and g.downscale == 32.0  # rows, columns
    g = choose_geometry(_stats(256, 4096), (128, 128), 1.0)  # asked for: tiles at native scale
    assert g.tiling is not None and g.tiling.scale == 1.0 and g.downscale == 1.0
    # 460 x 1130: shrunk until the short side is two tiles.
    g = choose_geometry(_stats(460, 1130), (128, 128), "auto")
    assert g.tiling is not None and round(460 * g.tiling.scale) == 256
    assert g.small_defect_warning() is None  # 1.8x: a 2 px defect keeps about a pixel
    # A tall commutator 500 x 1250: tiles; explicitly off: the whole-image squash, with the
    # small-defect warning naming the scale tiles would use.
    g = choose_geometry(_stats(1250, 500), (128, 128), "auto")
    assert g.tiling is not None and g.tiling.scale == pytest.approx(256 / 500)
    g = choose_geometry(_stats(1250, 500), (128, 128), "off")
    assert g.tiling is None and "narrower than" in (g.small_defect_warning() or "")
    assert "--tile-scale 0.512" in (g.small_defect_warning() or "")
    # --size auto: whole image with the data's aspect ratio, multiples of 16.
    g = choose_geometry(_stats(1250, 500), (128, 128), "auto", whole_auto=True)
    assert g.tiling is None and g.height % 16 == 0 and g.width % 16 == 0
    assert g.height > g.width and abs(g.height / g.width - 2.5) < 0.4


def _tiled_brightness_model(tmp_path: Path, scale: float) -> Path:
    from contract_models import make_brightness_model

    model = make_brightness_model(tmp_path / "tiled.onnx", height=64, width=64)
    meta = ModelMetadata.load(metadata_path(model))
    meta.input.tile_scale = scale
    meta.save(metadata_path(model))
    return model


def _large_parts(root: Path) -> None:
    rng = np.random.default_rng(5)
    for sub, n, defect in (("good", 3, False), ("spot", 3, True)):
        (root / "test" / sub).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(20, 60, size=(300, 520), dtype=np.uint8)
            if defect:
                cv2.circle(img, (400 - 60 * i, 90 + 40 * i), 26, 240, -1)
            cv2.imwrite(str(root / "test" / sub / f"{i:03d}.png"), img)
    (root / "train" / "good").mkdir(parents=True)


@pytest.mark.slow
def test_runtime_scores_equal_evaluation_scores_on_a_tiled_model(tmp_path: Path) -> None:
    model = _tiled_brightness_model(tmp_path, scale=0.5)
    data = tmp_path / "parts"
    _large_parts(data)
    pre = preprocessor_for(ModelMetadata.load(metadata_path(model)))
    assert pre.geometry((300, 520)).n_tiles > 1

    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "pouta.trainer.evaluate",
            "--onnx",
            str(model),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["tiles_per_image"] == pre.geometry((300, 520)).n_tiles
    assert report["image_auroc"] == 1.0
    eval_scores = {r["path"]: r["score"] for r in report["scores"]}

    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pouta.edge.cli",
            "run",
            "--images",
            str(data / "test"),
            "--model",
            str(model),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    parts = [json.loads(p.read_text()) for p in (out / "parts").rglob("*.json")]
    assert len(parts) == 6
    diffs = []
    for part in parts:
        src = Path(part["path"])
        key = part["path"]
        diffs.append(abs(part["score"] - eval_scores[key]))
        if src.parent.name == "spot":
            # The region lies where the spot was drawn, in source pixels.
            i = int(src.stem)
            cx, cy = 400 - 60 * i, 90 + 40 * i
            assert part["verdict"] == "NG"
            assert any(
                r["x"] <= cx <= r["x"] + r["width"] and r["y"] <= cy <= r["y"] + r["height"]
                for r in part["regions"]
            )
    assert max(diffs) < 1e-5


@pytest.mark.slow
def test_build_engine_calibrates_a_tiled_model_per_frame(tmp_path: Path) -> None:
    from pouta.calibration.cli import build_engine_main

    model = _tiled_brightness_model(tmp_path, scale=0.5)
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(9)
    for i in range(10):
        cv2.imwrite(str(good / f"{i:02d}.png"), rng.integers(20, 60, size=(300, 520), dtype=np.uint8))
    assert build_engine_main([str(model), "--int8", "--calib", str(good), "--min-calib", "8"]) == 0
    for name in ("tiled.int8.onnx", "tiled.int8.trt.onnx"):
        meta = ModelMetadata.load(tmp_path / f"{name}.json")
        # Thresholds come from one score per frame (stitched tiles), not one per tile.
        assert meta.thresholds is not None and meta.thresholds.n_normal == 10
        assert meta.input.tile_scale == 0.5  # the tiling travels with every artifact
    int8 = ModelMetadata.load(tmp_path / "tiled.int8.onnx.json").thresholds
    assert int8 is not None and int8.image > int8.normal_score_stats["max"]
