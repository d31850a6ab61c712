"""The training set: good images with synthetic anomalies, as torch tensors.

Only training imports this module (it needs torch); synthesis itself, grids and the
calibration tools use ``pouta.trainer.synthesis``, which does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pouta.edge.errors import ConfigError, ImageReadError
from pouta.edge.preprocess import Preprocessor, read_image
from torch.utils.data import Dataset

from .synthesis import AnomalySynthesizer, rotate_image

MIN_SAMPLES_PER_EPOCH = 128  # small sets: fewer worker restarts (one per epoch)


class TrainingSet(Dataset):
    """Good images with synthetic anomalies, as torch tensors.

    Originals are decoded and brought to work size once, at construction, and kept in
    memory in their integer dtype (forked DataLoader workers share them copy-on-write).
    A tiled model trains on random model-size crops of the work images; a whole-image
    model on the images themselves. An epoch has at least ``MIN_SAMPLES_PER_EPOCH``
    samples (sample ``i`` uses image ``i mod n``). Sample ``i`` of epoch ``e`` is drawn from
    ``default_rng([seed, e, i])``: reproducible after a resume and with any number of
    workers. Call ``set_epoch`` before creating each epoch's iterator (with
    ``persistent_workers=False``, the default, workers get the updated object).
    """

    def __init__(
        self, paths: Sequence[Path], pre: Preprocessor, synth: AnomalySynthesizer, seed: int
    ) -> None:
        if (pre.height, pre.width) != (synth.height, synth.width):
            raise ConfigError(
                f"synthesis size {synth.height}x{synth.width} differs from input size {pre.height}x{pre.width}"
            )
        self.pre = pre
        self.synth = synth
        self.seed = int(seed)
        self.epoch = 0
        kept: list[Path] = []
        self.originals: list[np.ndarray] = []  # work-size HxWx3 RGB, source dtype
        self.skipped: list[tuple[Path, str]] = []
        for p in paths:
            try:
                work = pre.resize_hwc(read_image(p))
            except ImageReadError as exc:
                self.skipped.append((Path(p), str(exc)))
                warnings.warn(f"skipping unreadable training image {exc}", stacklevel=2)
                continue
            ph, pw = max(work.shape[0], pre.height), max(work.shape[1], pre.width)
            if (ph, pw) != work.shape[:2]:
                work = cv2.copyMakeBorder(
                    work, 0, ph - work.shape[0], 0, pw - work.shape[1], cv2.BORDER_REFLECT_101
                )
            self.originals.append(np.ascontiguousarray(work))
            kept.append(Path(p))
        if not self.originals:
            raise ImageReadError(f"training set: none of the {len(paths)} given images could be read")
        self.paths = kept

    def __len__(self) -> int:
        return max(len(self.paths), MIN_SAMPLES_PER_EPOCH)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def original(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """A model-size [H, W, 3] float32 view of image ``i mod n``: a random crop when tiled."""
        work = self.originals[int(i) % len(self.originals)]
        h, w = self.pre.height, self.pre.width
        y = int(rng.integers(0, work.shape[0] - h + 1))
        x = int(rng.integers(0, work.shape[1] - w + 1))
        return self.pre.to_float(work[y : y + h, x : x + w]).transpose(1, 2, 0)

    def save_grids(self, out_dir: Path, n: int = 12) -> list[Path]:
        """``synthesis_<mode>.png`` for every mode with a weight: what training is taught."""
        rng = np.random.default_rng([self.seed, 0xC0FFEE])
        crops = [self.original(int(rng.integers(len(self.originals))), rng) for _ in range(4)]
        return [
            self.synth.save_grid(crops, out_dir / f"synthesis_{mode}.png", seed=self.seed, n=n, mode=mode)
            for mode, weight in self.synth.cfg.modes.items()
            if weight > 0
        ]

    def sample(self, i: int, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(augmented, original, mask, has_anomaly) as numpy: HWC images, [H,W] mask."""
        e = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, e, int(i)])
        original = self.original(i, rng)
        c = self.synth.cfg
        if c.rotate_original_prob > 0 and rng.random() < c.rotate_original_prob:
            original = rotate_image(original, rng.uniform(-90, 90))
        aug, mask, has = self.synth(original, rng)
        return aug, original, mask, has

    def __getitem__(self, i: int) -> dict[str, Any]:
        aug, original, mask, has = self.sample(i)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(aug.transpose(2, 0, 1))),
            "original": torch.from_numpy(np.ascontiguousarray(original.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None].copy()),
            "has_anomaly": torch.tensor(float(has), dtype=torch.float32),
        }
