"""Dataset readers on small generated trees of every layout, each with a corrupt file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.edge.contract.errors import PoutaError
from pouta.edge.contract.preprocess import Preprocessor
from pouta.trainer.data.readers import DatasetError, ImageRecord, open_dataset

PRE = Preprocessor(16, 16)


def _img(path: Path, value: int = 120, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (20, 24) if gray else (20, 24, 3)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def _mask(path: Path, box: tuple[int, int, int, int] = (2, 2, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((20, 24), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 255
    cv2.imwrite(str(path), m)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return path


def _mvtec(root: Path, with_gt: bool = True) -> Path:
    cat = root / "widget"
    for i in range(3):
        _img(cat / "train" / "good" / f"{i:03d}.png")
    _corrupt(cat / "train" / "good" / "003.png")
    _img(cat / "test" / "good" / "000.png")
    _img(cat / "test" / "good" / "001.png", gray=True)
    _img(cat / "test" / "scratch" / "000.png", 30)
    _img(cat / "test" / "scratch" / "001.png", 30)
    _img(cat / "test" / "hole" / "000.png", 200)
    _corrupt(cat / "test" / "hole" / "001.png")
    (cat / "test" / "hole" / "notes.txt").write_text("not an image")
    if with_gt:
        _mask(cat / "ground_truth" / "scratch" / "000_mask.png")
        _mask(cat / "ground_truth" / "hole" / "000_mask.png")
        # scratch/001 has no mask on purpose
    return cat


def test_mvtec_train_skips_corrupt_and_counts(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    with pytest.warns(UserWarning, match="003.png"):
        ds = open_dataset(cat, "train")
    assert ds.layout == "mvtec" and ds.name == "widget"
    assert [r.path.name for r in ds.records] == ["000.png", "001.png", "002.png"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0].name == "003.png"
    assert len(ds.good_paths()) == 3
    # the dataset root plus category= resolves to the same thing
    with pytest.warns(UserWarning):
        ds2 = open_dataset(tmp_path, "train", category="widget")
    assert ds2.records == ds.records


def test_mvtec_root_without_category_names_the_categories(tmp_path: Path) -> None:
    _mvtec(tmp_path)
    with pytest.raises(DatasetError, match="widget"):
        open_dataset(tmp_path, "train")


def test_mvtec_test_with_masks(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path)
    with pytest.warns(UserWarning) as rec:
        ds = open_dataset(cat, "test")
    messages = " ".join(str(w.message) for w in rec)
    assert "001.png" in messages and "no mask" in messages
    assert ds.has_masks
    assert ds.counts() == {"good": 2, "defective": 3, "skipped": 1, "missing_masks": 1}
    assert ds.defect_types == ["hole", "scratch"]
    by = {(r.defect_type, r.path.name): r for r in ds.records}
    assert by[("scratch", "000.png")].mask_path == cat / "ground_truth" / "scratch" / "000_mask.png"
    assert by[("scratch", "001.png")].mask_path is None
    assert by[("good", "000.png")].label == 0 and by[("hole", "000.png")].label == 1

    i_def = ds.records.index(by[("scratch", "000.png")])
    img, mask = ds.load(i_def, PRE)
    assert img.shape == (3, 16, 16) and img.dtype == np.float32
    assert mask is not None and mask.dtype == bool and mask.shape == (16, 16)
    assert 0 < mask.sum() < mask.size and mask[2, 2] and not mask[15, 15]
    img, mask = ds.load(ds.records.index(by[("good", "001.png")]), PRE)  # grayscale source
    assert img.shape == (3, 16, 16) and np.allclose(img[0], img[1])
    assert mask is not None and not mask.any()
    _, mask = ds.load(ds.records.index(by[("scratch", "001.png")]), PRE)
    assert mask is None


def test_mvtec_without_ground_truth(tmp_path: Path) -> None:
    cat = _mvtec(tmp_path, with_gt=False)
    with pytest.warns(UserWarning):
        ds = open_dataset(cat, "test")
    assert not ds.has_masks
    assert all(r.mask_path is None for r in ds.records)
    assert ds.missing_masks == []
    _, mask = ds.load(0, PRE)
    assert mask is None


def test_visa_csv(tmp_path: Path) -> None:
    root = tmp_path / "VisA"
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(2):
            _img(root / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG")
            rows.append(f"{obj},train,normal,{obj}/Data/Images/Normal/{i:04d}.JPG,")
        _img(root / obj / "Data" / "Images" / "Normal" / "0009.JPG")
        rows.append(f"{obj},test,normal,{obj}/Data/Images/Normal/0009.JPG,")
        _img(root / obj / "Data" / "Images" / "Anomaly" / "0000.JPG", 10)
        _mask(root / obj / "Data" / "Masks" / "Anomaly" / "0000.png")
        rows.append(
            f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/0000.JPG,{obj}/Data/Masks/Anomaly/0000.png"
        )
    _corrupt(root / "candle" / "Data" / "Images" / "Normal" / "0005.JPG")
    rows.append("candle,train,normal,candle/Data/Images/Normal/0005.JPG,")
    rows.append("candle,train,normal,candle/Data/Images/Normal/missing.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    with pytest.raises(DatasetError, match="category"):
        open_dataset(root, "train")
    with pytest.warns(UserWarning):
        train = open_dataset(root, "train", category="candle")
    assert train.layout == "visa" and train.name == "candle"
    assert len(train.records) == 2 and len(train.skipped) == 2
    assert {p.name for p, _ in train.skipped} == {"0005.JPG", "missing.JPG"}
    test = open_dataset(root, "test", category="pcb1")
    assert test.has_masks and [r.label for r in test.records] == [1, 0]
    assert all("pcb1" in str(r.path) for r in test.records)
    _, mask = test.load(0, PRE)
    assert mask is not None and mask.any()
    # the object folder itself, beside split_csv/, is understood too
    assert open_dataset(root / "pcb1", "test").records == test.records


def _dagm(root: Path) -> Path:
    cls = root / "Class1"
    for split, n in (("Train", 4), ("Test", 3)):
        folder = cls / split
        lines = ["1"]
        for i in range(1, n + 1):
            name = f"{i:04d}.PNG"
            _img(folder / name, gray=True)
            if i % 2 == 0:
                _mask(folder / "Label" / f"{i:04d}_label.PNG")
                lines.append(f"{i}\t1\t{name}\t0\t{i:04d}_label.PNG")
            else:
                lines.append(f"{i}\t0\t{name}\t0\t0")
        (folder / "Labels.txt").write_text("\n".join(lines) + "\n")
    _corrupt(cls / "Test" / "0004.PNG")
    with (cls / "Test" / "Labels.txt").open("a") as fh:
        fh.write("4\t0\t0004.PNG\t0\t0\n")
    return cls


def test_dagm(tmp_path: Path) -> None:
    cls = _dagm(tmp_path)
    train = open_dataset(cls, "train")
    assert train.layout == "dagm"
    assert [r.label for r in train.records] == [0, 1, 0, 1]
    assert [p.name for p in train.good_paths()] == ["0001.PNG", "0003.PNG"]
    with pytest.warns(UserWarning, match="0004.PNG"):
        test = open_dataset(tmp_path, "test", category="Class1")
    assert test.has_masks and len(test.skipped) == 1
    assert [(r.path.name, r.label) for r in test.records] == [
        ("0001.PNG", 0),
        ("0002.PNG", 1),
        ("0003.PNG", 0),
    ]
    img, mask = test.load(1, PRE)
    assert img.shape == (3, 16, 16) and mask is not None and mask.any()


def test_dagm_without_labels_txt_uses_label_files(tmp_path: Path) -> None:
    cls = _dagm(tmp_path)
    (cls / "Test" / "Labels.txt").unlink()
    with pytest.warns(UserWarning):
        test = open_dataset(cls, "test")
    assert [r.label for r in test.records] == [0, 1, 0]


def test_plain_folder(tmp_path: Path) -> None:
    good = tmp_path / "parts"
    for i in range(3):
        _img(good / f"{i}.jpg")
    _corrupt(good / "bad.png")
    with pytest.warns(UserWarning, match="bad.png"):
        ds = open_dataset(good, "train")
    assert ds.layout == "folder" and len(ds.records) == 3 and len(ds.skipped) == 1
    assert not ds.has_masks

    test_root = tmp_path / "line_test"
    _img(test_root / "good" / "a.png")
    _img(test_root / "defect" / "b.png", 0)
    _img(test_root / "dent" / "c.png", 0)
    ds = open_dataset(test_root, "test", layout="folder")
    assert sorted((r.defect_type, r.label) for r in ds.records) == [("defect", 1), ("dent", 1), ("good", 0)]
    assert not ds.has_masks


def test_empty_or_all_corrupt_dataset_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no usable train images.*expected") as exc:
        open_dataset(empty)
    assert isinstance(exc.value, PoutaError) and "\n" not in str(exc.value)
    broken = tmp_path / "broken"
    _corrupt(broken / "x.png")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="1 unreadable"):
        open_dataset(broken)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="split"):
        open_dataset(empty, split="val")


def test_record_is_frozen() -> None:
    r = ImageRecord(Path("a.png"), 0, "good", None)
    with pytest.raises(AttributeError):
        r.label = 1  # type: ignore[misc]


def test_data_module_imports_without_torch() -> None:
    code = (
        "import sys; import pouta.trainer.data.readers, pouta.trainer.metrics, pouta.trainer.synthesis.anomalies;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
