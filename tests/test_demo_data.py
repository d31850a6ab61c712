"""Demo data: MVTec layout, masks that mark exactly the drawn defects, determinism."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.trainer.data.demo_data import DEFECT_TYPES, main, make_demo_dataset
from pouta.trainer.data.readers import open_dataset


def test_layout_and_masks(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path, n_train=4, n_test_good=2, n_test_defect=2, size=64, seed=3)
    assert root == tmp_path / "surface"
    assert len(list((root / "train" / "good").glob("*.png"))) == 4
    assert len(list((root / "test" / "good").glob("*.png"))) == 2
    assert set(DEFECT_TYPES) == {"scratch", "spot", "crack"}
    for kind in DEFECT_TYPES:
        for i in range(2):
            img = cv2.imread(str(root / "test" / kind / f"{i:03d}.png"))
            mask = cv2.imread(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), cv2.IMREAD_GRAYSCALE)
            assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert set(np.unique(mask)) == {0, 255}
            on = mask > 0
            assert 0 < on.mean() < 0.2
            # the defect is clearly visible: it differs from the surrounding surface
            ring = cv2.dilate(on.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~on
            assert abs(float(img[on].mean()) - float(img[ring].mean())) > 30
    ds = open_dataset(root, "test")
    assert ds.has_masks and ds.defect_types == sorted(DEFECT_TYPES)
    assert ds.counts() == {"good": 2, "defective": 6, "skipped": 0, "missing_masks": 0}
    # good images differ from one another (jitter), but are the same surface
    a = cv2.imread(str(root / "train" / "good" / "000.png")).astype(float)
    b = cv2.imread(str(root / "train" / "good" / "001.png")).astype(float)
    assert np.abs(a - b).mean() > 1


def test_deterministic_and_grayscale(tmp_path: Path) -> None:
    r1 = make_demo_dataset(tmp_path / "a", n_train=2, n_test_good=1, n_test_defect=1, size=48, seed=7)
    r2 = make_demo_dataset(tmp_path / "b", n_train=2, n_test_good=1, n_test_defect=1, size=48, seed=7)
    for rel in ("train/good/001.png", "test/crack/000.png", "ground_truth/spot/000_mask.png"):
        assert (r1 / rel).read_bytes() == (r2 / rel).read_bytes()
    g = make_demo_dataset(tmp_path / "g", n_train=2, n_test_good=1, n_test_defect=1, size=48, grayscale=True)
    img = cv2.imread(str(g / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
    assert img.ndim == 2


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "--out",
            str(tmp_path),
            "--n-train",
            "2",
            "--n-test-good",
            "1",
            "--n-test-defect",
            "1",
            "--size",
            "40",
        ]
    )
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "surface")
    assert main(["--out", str(tmp_path), "--size", "8"]) == 2
