"""Inspection datasets: MVTec AD, VisA, DAGM 2007 and a plain folder of good images.

Every reader returns the same ``InspectionDataset``: a list of ``ImageRecord`` (path,
label, defect type, mask path) plus what was skipped and why. Images go through the one
``Preprocessor`` on ``load``; nothing here resizes or normalises on its own.

No torch import: the calibration tool and the edge runtime read datasets too.

Longer than ~350 lines on purpose: all readers side by side, so that the rules they
share (skipped files, mask checks, labels) visibly stay the same across layouts.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pouta.edge.contract.errors import ImageReadError, PoutaError
from pouta.edge.contract.preprocess import Preprocessor, is_image_file, read_image, read_mask

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("auto", "mvtec", "visa", "dagm", "folder")
SPLITS: tuple[str, ...] = ("train", "test")

_LAYOUT_HELP = {
    "mvtec": "MVTec AD: <category>/train/good/*.png, <category>/test/<defect>/*.png, "
    "optional <category>/ground_truth/<defect>/<name>_mask.png",
    "visa": "VisA: <root>/split_csv/1cls.csv (object,split,label,image,mask) with paths relative to <root>",
    "dagm": "DAGM 2007: <ClassN>/Train and <ClassN>/Test with NNNN.PNG images, Label/NNNN_label.PNG, Labels.txt",
    "folder": "a folder of good images (train), or good/ plus defect-named subfolders (test)",
}


class DatasetError(PoutaError):
    """A dataset folder is missing, has an unknown layout, or holds no usable images."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask_path: Path | None


@dataclass
class InspectionDataset:
    name: str
    split: str
    records: list[ImageRecord]
    has_masks: bool
    skipped: list[tuple[Path, str]]
    layout: str = "folder"
    root: Path = field(default_factory=Path)
    # Defective images that should have had a mask but do not: image metrics only.
    missing_masks: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int, pre: Preprocessor) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``i`` at work size [3,h,w] float32 and its mask [h,w] bool (or None).

        The work size is the model input for whole-image models and the rescaled image
        that tiles are cut from for tiled ones (``pre.geometry``). Good images get an
        all-False mask when the dataset has masks, so pixel metrics see them as
        all-normal; a defective image without a mask file gets None.
        """
        rec = self.records[i]
        raw = read_image(rec.path)
        image = pre(raw)
        if not self.has_masks:
            return image, None
        if rec.label == 0:
            return image, np.zeros(image.shape[1:], dtype=bool)
        if rec.mask_path is None:
            return image, None
        m = read_mask(rec.mask_path)
        if m.shape != raw.shape[:2]:
            # The ROI crop is defined in image pixels: bring the mask there first.
            m = cv2.resize(m.astype(np.uint8), (raw.shape[1], raw.shape[0]), interpolation=cv2.INTER_NEAREST)
        return image, pre.mask(m)

    def good_paths(self) -> list[Path]:
        return [r.path for r in self.records if r.label == 0]

    @property
    def defect_types(self) -> list[str]:
        return sorted({r.defect_type for r in self.records if r.label == 1})

    def counts(self) -> dict[str, int]:
        return {
            "good": sum(r.label == 0 for r in self.records),
            "defective": sum(r.label == 1 for r in self.records),
            "skipped": len(self.skipped),
            "missing_masks": len(self.missing_masks),
        }


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _child(folder: Path, name: str) -> Path | None:
    """Case-insensitive child lookup: DAGM ships ``Train``/``Test``/``Label``, copies vary."""
    exact = folder / name
    if exact.exists():
        return exact
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.lower() == name.lower():
                return p
    return None


def _usable(path: Path, skipped: list[tuple[Path, str]]) -> bool:
    """Decode once at open time so a corrupt file is reported up front, not mid-epoch."""
    try:
        read_image(path)
    except ImageReadError as exc:
        reason = str(exc)
        skipped.append((path, reason))
        warnings.warn(f"skipping unreadable image {reason}", stacklevel=3)
        log.warning("skipping unreadable image %s", reason)
        return False
    return True


def _check_mask(
    rec_path: Path,
    mask_path: Path | None,
    expected: str,
    missing: list[Path],
    skipped: list[tuple[Path, str]],
) -> Path | None:
    if mask_path is None or not mask_path.is_file():
        missing.append(rec_path)
        msg = f"{rec_path}: defective image has no mask (expected {expected}); image metrics only for it"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return None
    try:
        read_mask(mask_path)
    except ImageReadError as exc:
        missing.append(rec_path)
        skipped.append((mask_path, str(exc)))
        msg = f"{rec_path}: mask is unreadable ({exc}); image metrics only for it"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
        return None
    return mask_path


def _mvtec_mask(gt_dir: Path, defect: str, image: Path) -> Path | None:
    folder = gt_dir / defect
    for cand in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
        if cand.is_file():
            return cand
    for cand in sorted(folder.glob(f"{image.stem}_mask.*")) if folder.is_dir() else []:
        if is_image_file(cand):
            return cand
    return None


def _defect_folders(
    subs: list[Path], gt: Path, has_masks: bool, skipped: list[tuple[Path, str]], missing: list[Path]
) -> list[ImageRecord]:
    """Images of ``good/`` (label 0) and of one folder per defect type (label 1), with
    MVTec-style masks ``gt/<defect>/<stem>_mask.png`` when ``has_masks``."""
    records: list[ImageRecord] = []
    for sub in subs:
        label = 0 if sub.name == "good" else 1
        for p in _list_images(sub):
            if not _usable(p, skipped):
                continue
            mask = None
            if label == 1 and has_masks:
                expected = gt / sub.name / f"{p.stem}_mask.png"
                mask = _check_mask(p, _mvtec_mask(gt, sub.name, p), str(expected), missing, skipped)
            records.append(ImageRecord(p, label, sub.name, mask))
    return records


def _read_mvtec(root: Path, split: str, name: str) -> InspectionDataset:
    skipped: list[tuple[Path, str]] = []
    missing: list[Path] = []
    gt = root / "ground_truth"
    has_masks = split == "test" and gt.is_dir()
    if not has_masks and split == "test":
        log.info("%s: no ground_truth/: pixel metrics skipped", root)
    records = _defect_folders(_subdirs(root / split), gt, has_masks, skipped, missing)
    return InspectionDataset(name, split, records, has_masks, skipped, "mvtec", root, missing)


def _read_visa(root: Path, split: str, category: str | None) -> InspectionDataset:
    csv_path = root / "split_csv" / "1cls.csv"
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DatasetError(f"{csv_path}: expected a CSV with columns {sorted(needed)}")
    objects = sorted({r["object"] for r in rows})
    if category is None:
        if len(objects) != 1:
            raise DatasetError(f"{root}: VisA holds {len(objects)} objects {objects}; pass category=")
        category = objects[0]
    if category not in objects:
        raise DatasetError(f"{csv_path}: no rows for object {category!r}; objects: {objects}")
    skipped: list[tuple[Path, str]] = []
    missing: list[Path] = []
    records: list[ImageRecord] = []
    has_masks = split == "test"
    for r in rows:
        if r["object"] != category or r["split"].strip().lower() != split:
            continue
        p = root / r["image"].strip()
        label = 1 if r["label"].strip().lower() == "anomaly" else 0
        if not _usable(p, skipped):
            continue
        mask = None
        if label == 1 and has_masks:
            m = r["mask"].strip()
            mask = _check_mask(p, root / m if m else None, "the CSV's mask column", missing, skipped)
        records.append(ImageRecord(p, label, "anomaly" if label else "good", mask))
    records.sort(key=lambda rec: str(rec.path))
    return InspectionDataset(category, split, records, has_masks, skipped, "visa", root, missing)


def _dagm_labels(folder: Path) -> dict[str, str | None]:
    """Labels.txt: a header line, then ``index<TAB>defective<TAB>image<TAB>0<TAB>label_file``."""
    txt = _child(folder, "Labels.txt")
    out: dict[str, str | None] = {}
    if txt is None or not txt.is_file():
        return out
    for line in txt.read_text(errors="replace").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 3:
            continue
        defective = parts[1] == "1"
        label_file = parts[4] if defective and len(parts) >= 5 and parts[4] != "0" else None
        out[parts[2]] = label_file if defective else None
    return out


def _read_dagm(root: Path, split: str, name: str) -> InspectionDataset:
    folder = _child(root, split.capitalize())
    if folder is None:
        raise DatasetError(f"{root}: expected a {split.capitalize()}/ folder ({_LAYOUT_HELP['dagm']})")
    label_dir = _child(folder, "Label")
    listed = _dagm_labels(folder)
    skipped: list[tuple[Path, str]] = []
    missing: list[Path] = []
    records: list[ImageRecord] = []
    has_masks = split == "test"
    for p in _list_images(folder):
        if listed:
            if p.name not in listed:
                continue
            label_name = listed[p.name]
            defective = label_name is not None
        else:
            # No Labels.txt: a label mask beside the image is what marks it defective.
            cand = label_dir / f"{p.stem}_label.PNG" if label_dir else None
            found = [
                c for c in (label_dir.glob(f"{p.stem}_label.*") if label_dir else []) if is_image_file(c)
            ]
            label_name = found[0].name if found else (cand.name if cand and cand.is_file() else None)
            defective = label_name is not None
        if not _usable(p, skipped):
            continue
        mask = None
        if defective and has_masks:
            mpath = (label_dir / label_name) if (label_dir and label_name) else None
            mask = _check_mask(p, mpath, f"Label/{p.stem}_label.PNG", missing, skipped)
        records.append(ImageRecord(p, int(defective), "defect" if defective else "good", mask))
    return InspectionDataset(name, split, records, has_masks, skipped, "dagm", root, missing)


def _read_folder(root: Path, split: str, name: str) -> InspectionDataset:
    skipped: list[tuple[Path, str]] = []
    missing: list[Path] = []
    if split == "train":
        files = _list_images(root) or _list_images(root / "good")
        records = [ImageRecord(p, 0, "good", None) for p in files if _usable(p, skipped)]
        return InspectionDataset(name, split, records, False, skipped, "folder", root, missing)
    gt = root / "ground_truth"
    has_masks = gt.is_dir()
    subs = [sub for sub in _subdirs(root) if sub.name != "ground_truth"]
    records = _defect_folders(subs, gt, has_masks, skipped, missing)
    return InspectionDataset(name, split, records, has_masks, skipped, "folder", root, missing)


def _is_mvtec(p: Path) -> bool:
    return (p / "train").is_dir() or (p / "test").is_dir()


def _is_dagm(p: Path) -> bool:
    return _child(p, "Train") is not None and _child(p, "Test") is not None and not _is_mvtec(p)


def detect_layout(root: Path, category: str | None = None) -> tuple[str, Path, str | None]:
    """(layout, resolved root, category) for ``layout="auto"``."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa", root, category
    if (root.parent / "split_csv" / "1cls.csv").is_file() and category is None:
        return "visa", root.parent, root.name
    base = root / category if category else root
    if category and not base.is_dir():
        raise DatasetError(f"{root}: no category folder {category!r}")
    if _is_mvtec(base):
        return "mvtec", base, category
    if _is_dagm(base):
        return "dagm", base, category
    if category is None:
        cats = [d.name for d in _subdirs(root) if _is_mvtec(d) or _is_dagm(d)]
        if cats:
            raise DatasetError(f"{root}: a dataset root with categories {cats}; pass category= (--category)")
    return "folder", base, category


def open_dataset(
    root: str | os.PathLike[str],
    split: str = "train",
    layout: str = "auto",
    category: str | None = None,
) -> InspectionDataset:
    """Open one category's train or test split. Raises ``DatasetError`` with the folder and
    the expected layout when the folder is missing or nothing in it can be used."""
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    if layout not in LAYOUTS:
        raise DatasetError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if layout == "auto":
        layout, base, category = detect_layout(root, category)
    elif layout == "visa":
        base = root
    else:
        base = root / category if category else root
        if not base.is_dir():
            raise DatasetError(f"{root}: no category folder {category!r}")
    name = category or base.name
    if layout == "mvtec":
        ds = _read_mvtec(base, split, name)
    elif layout == "visa":
        ds = _read_visa(base, split, category)
    elif layout == "dagm":
        ds = _read_dagm(base, split, name)
    else:
        ds = _read_folder(base, split, name)
    if not ds.records:
        extra = f"; {len(ds.skipped)} unreadable file(s) skipped" if ds.skipped else ""
        raise DatasetError(
            f"{base}: no usable {split} images (layout {layout}: expected {_LAYOUT_HELP[layout]}){extra}"
        )
    if split == "train" and not ds.good_paths():
        raise DatasetError(f"{base}: the train split has no good images to train on")
    return ds
