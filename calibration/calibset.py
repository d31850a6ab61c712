"""Calibration image sets: a folder of normal images, sampled deterministically.

The same set feeds INT8 calibration (activation ranges) and threshold calibration
(normal score statistics), so the sample, its hash and its skipped files are decided
once here and recorded in every artifact's metadata. Preprocessing is the runtime's own
``Preprocessor``: calibrating on differently preprocessed pixels would calibrate a
different model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from pouta.edge.contract.errors import ImageReadError
from pouta.edge.contract.geometry import FrameGeometry
from pouta.edge.contract.metadata import INPUT_NAME
from pouta.edge.contract.preprocess import IMAGE_EXTENSIONS, Preprocessor, is_image_file, read_image

from .errors import CalibrationError

DEFAULT_N_CALIB = 128
# Fewer normals than this give activation ranges and a normal-score maximum that are
# mostly noise; the threshold would then be chosen on a handful of parts.
DEFAULT_MIN_IMAGES = 16
# Keep decoded images in memory up to this size; larger sets are re-read per pass.
CACHE_LIMIT_BYTES = 512 * 1024 * 1024


def list_images(folder: str | os.PathLike[str], what: str = "calibration") -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by relative path.

    Sorting by the relative POSIX path makes the order, and so the seeded sample, the
    same on every machine and filesystem.
    """
    root = Path(folder)
    if not root.exists():
        raise CalibrationError(f"{root}: {what} folder not found")
    if not root.is_dir():
        raise CalibrationError(f"{root}: expected a folder of {what} images, got a file")
    files = [p for p in root.rglob("*") if p.is_file() and is_image_file(p)]
    if not files:
        raise CalibrationError(
            f"{root}: no image files in the {what} folder (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class ImageSet:
    """A deterministic sample of usable images from one folder, preprocessed on demand."""

    folder: Path
    files: list[Path]
    preprocessor: Preprocessor
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    n_found: int = 0
    seed: int = 0
    sha256: str = ""
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> np.ndarray:
        """Preprocessed image ``index`` at work size as float32 [3, h, w] (the model input
        itself unless the model is tiled)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        arr = self.preprocessor(read_image(self.files[index]))
        if (len(self._cache) + 1) * arr.nbytes <= CACHE_LIMIT_BYTES:
            self._cache[index] = arr
        return arr

    def frames(self) -> Iterator[tuple[np.ndarray, FrameGeometry]]:
        """(work image, geometry) in file order, for ``score_frames``."""
        for i in range(len(self.files)):
            work = self.image(i)
            yield work, self.preprocessor.geometry_of_work(work.shape[1:])

    def model_input(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """One model input [3, H, W] of image ``index``: the image, or one of its tiles at random."""
        work = self.image(index)
        tiles = self.preprocessor.geometry_of_work(work.shape[1:]).cut(work)
        return tiles[int(rng.integers(len(tiles)))] if len(tiles) > 1 else tiles[0]

    def describe(self) -> dict[str, Any]:
        """What the metadata records about this set (no absolute paths: they leak and drift)."""
        return {
            "folder": self.folder.name,
            "set_sha256": self.sha256,
            "size": len(self.files),
            "found": self.n_found,
            "skipped": len(self.skipped),
            "seed": self.seed,
        }


def load_image_set(
    folder: str | os.PathLike[str],
    preprocessor: Preprocessor,
    n: int | None = DEFAULT_N_CALIB,
    seed: int = 0,
    min_images: int = DEFAULT_MIN_IMAGES,
    what: str = "calibration",
    on_skip: Callable[[Path, str], None] | None = None,
    exclude: Collection[Path] = (),
) -> ImageSet:
    """Pick up to ``n`` usable images from ``folder`` (all when ``n`` is None).

    Files are visited in a seeded permutation of the sorted list, so a corrupt file is
    replaced by the next one in that permutation and the sample stays deterministic.
    Each chosen file is decoded and preprocessed once here, which both validates it and
    fills the cache for the passes that follow.
    """
    root = Path(folder)
    files = list_images(root, what)
    if exclude:
        held = set(exclude)
        files = [p for p in files if p not in held]
        if not files:
            raise CalibrationError(f"{root}: no {what} images left after excluding {len(held)} already used")
    order = np.random.default_rng(seed).permutation(len(files)) if n is not None else range(len(files))
    want = len(files) if n is None else min(n, len(files))
    chosen: list[int] = []
    skipped: list[tuple[Path, str]] = []
    images: dict[int, np.ndarray] = {}
    for idx in order:
        if len(chosen) >= want:
            break
        path = files[int(idx)]
        try:
            arr = preprocessor(read_image(path))
        except ImageReadError as exc:
            reason = str(exc)
            skipped.append((path, reason))
            if on_skip is not None:
                on_skip(path, reason)
            continue
        chosen.append(int(idx))
        images[int(idx)] = arr
    if len(chosen) < min_images:
        raise CalibrationError(
            f"{root}: {len(chosen)} usable {what} images found ({len(files)} files, {len(skipped)} unreadable), "
            f"need at least {min_images}"
        )
    chosen.sort()
    out = ImageSet(
        folder=root,
        files=[files[i] for i in chosen],
        preprocessor=preprocessor,
        skipped=skipped,
        n_found=len(files),
        seed=seed,
        sha256=_set_hash(root, [files[i] for i in chosen]),
    )
    for pos, idx in enumerate(chosen):
        if (pos + 1) * images[idx].nbytes <= CACHE_LIMIT_BYTES:
            out._cache[pos] = images[idx]
    return out


def _set_hash(root: Path, files: Sequence[Path]) -> str:
    # Names and contents both: renaming a file or swapping a pixel changes the hash.
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


DEFAULT_SYNTHETIC_FRACTION = 0.5


def synthetic_anomaly(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` [3,H,W] in [0,1] with one synthetic defect blended in.

    Why calibration needs these: activation ranges taken from normal images only end
    where normal parts end, so the larger activations a defect produces are clipped to
    the normal maximum and the defect disappears in INT8 (a bright spot on a dark part
    reads as dark). A detector is trained on synthetic anomalies for the same reason.
    These are made from the normal images themselves, so no real defect image enters
    calibration. Defect content: uniform noise, a flat dark or bright fill, or a shifted
    patch of another normal image (cut-paste), in an ellipse of 5-30% of the side.
    """
    _, h, w = image.shape
    out = image.copy()
    ry = max(1, int(h * rng.uniform(0.05, 0.3) / 2))
    rx = max(1, int(w * rng.uniform(0.05, 0.3) / 2))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    yy, xx = np.ogrid[:h, :w]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    kind = int(rng.integers(0, 4))
    if kind == 0:
        fill = rng.random((3, h, w), dtype=np.float32)
    elif kind == 1:
        fill = np.zeros((3, h, w), np.float32)
    elif kind == 2:
        fill = np.ones((3, h, w), np.float32)
    else:
        fill = np.roll(donor, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(1, 2))
    alpha = np.float32(rng.uniform(0.5, 1.0))
    out[:, mask] = (1 - alpha) * out[:, mask] + alpha * fill[:, mask]
    return np.clip(out, 0.0, 1.0, out=out)


class ImageSetReader(CalibrationDataReader):
    """Feeds an ``ImageSet`` to ONNX Runtime's static-quantization calibrators.

    ``synthetic_fraction`` of the images get a synthetic defect (see
    ``synthetic_anomaly``), seeded so the same set always yields the same inputs.
    """

    # One image per call: ONNX Runtime's histogram calibrators (entropy, percentile)
    # stack per-call outputs and fail on a short last batch.
    def __init__(
        self,
        images: ImageSet,
        synthetic_fraction: float = DEFAULT_SYNTHETIC_FRACTION,
        seed: int = 0,
        input_name: str = INPUT_NAME,
    ) -> None:
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise CalibrationError(f"synthetic anomaly fraction must lie in [0, 1], got {synthetic_fraction}")
        self.images = images
        self.synthetic_fraction = synthetic_fraction
        self.seed = seed
        self.input_name = input_name
        self._next = 0
        self._rng = np.random.default_rng(seed)

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self._next
        if i >= len(self.images):
            return None
        self._next += 1
        img = self.images.model_input(i, self._rng)
        if self._rng.random() < self.synthetic_fraction:
            donor = self.images.model_input(int(self._rng.integers(0, len(self.images))), self._rng)
            img = synthetic_anomaly(img, donor, self._rng)
        return {self.input_name: img[None]}

    def rewind(self) -> None:
        self._next = 0
        self._rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return len(self.images)
