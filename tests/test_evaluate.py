"""evaluate() with a deterministic numpy scorer on demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pouta.edge.contract.preprocess import Preprocessor
from pouta.trainer.data.demo_data import make_demo_dataset
from pouta.trainer.data.readers import open_dataset
from pouta.trainer.evaluate import NO_MASKS_NOTE, Scorer, evaluate, main

SIZE = 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo"), n_train=2, n_test_good=4, n_test_defect=3, size=SIZE, seed=1
    )


def _oracle_scorer() -> Scorer:
    """Scores an image by its distance from a flat median: defects (dark/bright marks) stand out."""

    def score(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = x.mean(axis=1)
        med = np.median(g, axis=(1, 2), keepdims=True)
        amap = np.clip(np.abs(g - med) * 2, 0, 1).astype(np.float32)[:, None]
        return amap, amap.reshape(len(x), -1).max(axis=1)

    return score


def test_report_with_masks(demo: Path, tmp_path: Path) -> None:
    ds = open_dataset(demo, "test")
    out = tmp_path / "eval"
    res = evaluate(
        _oracle_scorer(), ds, Preprocessor(SIZE, SIZE), out_dir=out, batch_size=4, progress=False, n_worst=2
    )
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "per_defect_type", "counts"):
        assert key in res
    assert res["counts"]["good"] == 4 and res["counts"]["defective"] == 9
    assert 0.5 < res["image_auroc"] <= 1.0
    assert 0.5 < res["pixel_auroc"] <= 1.0 and 0.0 < res["pixel_ap"] <= 1.0 and 0.0 < res["aupro"] <= 1.0
    assert res["pixel_method"] == "exact" and res["notes"] == []
    assert set(res["per_defect_type"]) == {"scratch", "spot", "crack"}
    for e in res["per_defect_type"].values():
        assert e["n"] == 3 and e["image_auroc"] is not None and e["pixel_auroc"] is not None
    # worst false positives are the highest-scoring good images
    fp = res["worst_false_positives"]
    assert len(fp) == 2 and fp[0]["score"] >= fp[1]["score"] and "/good/" in fp[0]["path"]
    assert len(res["worst_false_negatives"]) == 2
    written = json.loads((out / "report.json").read_text())
    assert written["image_auroc"] == pytest.approx(res["image_auroc"])
    assert (out / "score_histogram.png").stat().st_size > 1000
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.name[:2] for p in overlays] == ["fn", "fn", "fp", "fp"]


def test_constant_scorer_is_chance_and_perfect_scorer_is_one(demo: Path) -> None:
    ds = open_dataset(demo, "test")
    pre = Preprocessor(SIZE, SIZE)

    def flat(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(x), SIZE, SIZE), np.float32), np.zeros(len(x), np.float32)

    res = evaluate(flat, ds, pre, progress=False)
    assert res["image_auroc"] == pytest.approx(0.5) and res["pixel_auroc"] == pytest.approx(0.5)

    # A scorer that "knows" the ground truth: maps = masks, scores = label.
    truth = {}
    for i in range(len(ds)):
        img, m = ds.load(i, pre)
        truth[img.tobytes()] = m

    def perfect(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = np.stack([truth[im.tobytes()].astype(np.float32) for im in x])
        return maps, maps.reshape(len(x), -1).max(axis=1)

    res = evaluate(perfect, ds, pre, progress=False)
    assert res["image_auroc"] == 1.0 and res["pixel_auroc"] == 1.0 and res["aupro"] == pytest.approx(1.0)


def test_without_ground_truth_pixel_metrics_are_skipped(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "nogt"
    shutil.copytree(demo, copy)
    shutil.rmtree(copy / "ground_truth")
    ds = open_dataset(copy, "test")
    res = evaluate(_oracle_scorer(), ds, Preprocessor(SIZE, SIZE), out_dir=tmp_path / "o", progress=False)
    assert res["image_auroc"] is not None
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert NO_MASKS_NOTE in res["notes"]
    assert "pixel metrics skipped" in capsys.readouterr().err
    assert "pixel_auroc" not in res["per_defect_type"]["spot"]


def test_bad_scorer_output_is_reported(demo: Path) -> None:
    ds = open_dataset(demo, "test")
    with pytest.raises(ValueError, match=r"model output: expected maps \[N,1,64,64\]"):
        evaluate(
            lambda x: (np.zeros((len(x), 2, SIZE, SIZE)), np.zeros(len(x))),
            ds,
            Preprocessor(SIZE, SIZE),
            progress=False,
        )


def test_cli_onnx(
    demo: Path, tmp_path: Path, brightness_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        ["--onnx", str(brightness_onnx), "--data", str(demo), "--out", str(tmp_path / "r"), "--no-progress"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "image AUROC" in out.out and (tmp_path / "r" / "report.json").is_file()
    assert main(["--onnx", str(brightness_onnx), "--data", str(tmp_path / "missing")]) == 2


def test_torch_scorer_wraps_a_model() -> None:
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from pouta.trainer.evaluate import torch_scorer

    class Bright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            amap = x.mean(dim=1, keepdim=True)
            return SimpleNamespace(anomaly_map=amap, score=amap.flatten(1).amax(dim=1))

    model = Bright().train()
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    maps, scores = torch_scorer(model)(x)
    assert not model.training
    assert isinstance(maps, np.ndarray) and maps.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(scores, x.mean(axis=1).reshape(2, -1).max(axis=1), rtol=1e-6)
