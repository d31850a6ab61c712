"""What feeds training: the good images found and their geometry, the training set (good
images with synthetic anomalies, as torch tensors) and the deterministic batch order.

Only training imports this module (it needs torch); synthesis itself, grids and the
calibration tools use ``pouta.trainer.synthesis.anomalies``, which does not.
"""

from __future__ import annotations

import faulthandler
import signal
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pouta.edge.contract.errors import ConfigError, ImageReadError
from pouta.edge.contract.preprocess import Preprocessor, read_image
from torch.utils.data import Dataset

from ..geometry import (
    AUTO_WIDTHS,
    TILED_DISC_WIDEN,
    choose_geometry,
    preprocessor_for_training,
    scan_images,
)
from ..models import ModelConfig
from ..models.config import BACKBONE_KINDS, BACKBONE_SIZE_MULTIPLE, SIZE_MULTIPLE
from ..synthesis.anomalies import AnomalySynthesizer, SynthesisConfig
from ..synthesis.augment import rotate_image
from ..train_config import resolve_auto_model

MIN_SAMPLES_PER_EPOCH = 128  # small sets: fewer worker restarts (one per epoch)
HELD_OUT_SHARE = 0.15
# Share of training samples drawn from the real defects (``--defects``) when there are any;
# the rest keep the synthetic anomalies that cover what the few real ones do not.
REAL_DEFECT_PROBABILITY = 0.3  # good images kept out of a memory to fit its normalisers on


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
        self,
        paths: Sequence[Path],
        pre: Preprocessor,
        synth: AnomalySynthesizer,
        seed: int,
        real_defects: Sequence[tuple[np.ndarray, np.ndarray]] = (),
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
        # (work-size [3,h,w] float32 image, [h,w] bool mask) of each real defective part
        self.real_defects = list(real_defects)

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

    def normal_inputs(self, n: int) -> np.ndarray:
        """Normal model inputs [k,3,H,W] float32, no synthesis: k = min(n, images) distinct
        images for a whole-image model, n random crops for a tiled one."""
        rng = np.random.default_rng([self.seed, 0xC0E5])
        order = rng.permutation(len(self.originals))
        k = n if self.pre.tiling is not None else min(n, len(order))
        return np.stack([self.original(int(order[i % len(order)]), rng).transpose(2, 0, 1) for i in range(k)])

    def normal_split(self, n_fit: int, n_held: int) -> tuple[np.ndarray, np.ndarray]:
        """Normal model inputs from two disjoint sets of images, no synthesis: (fit [k,3,H,W],
        held out [j,3,H,W]). The held-out images are a share ``HELD_OUT_SHARE`` of the good
        images (at least one; all images when there is only one). Whole images: each image
        at most once; tiles: ``n_fit`` / ``n_held`` random crops."""
        rng = np.random.default_rng([self.seed, 0x5B11])
        order = rng.permutation(len(self.originals))
        n_out = max(1, round(HELD_OUT_SHARE * len(order))) if len(order) > 1 else 0
        held, fit = (order[:n_out], order[n_out:]) if n_out else (order, order)

        def take(images: np.ndarray, n: int) -> np.ndarray:
            k = n if self.pre.tiling is not None else min(n, len(images))
            return np.stack(
                [self.original(int(images[i % len(images)]), rng).transpose(2, 0, 1) for i in range(k)]
            )

        return take(fit, n_fit), take(held, n_held)

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
        if self.real_defects and rng.random() < REAL_DEFECT_PROBABILITY:
            aug, mask = self.real_defect(original, rng)
            return aug, original, mask, bool(mask.any())
        aug, mask, has = self.synth(original, rng)
        return aug, original, mask, has

    def real_defect(self, original: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A real defect, as PRN's "seen" anomalies: half the time the defective part itself
        (a model-size window on its defect), half the time its defect region, flipped and
        rotated by a quarter turn at random, pasted onto this good ``original`` ("extended").
        Returns (image HxWx3 float32, mask HxW float32)."""
        h, w = original.shape[:2]
        image, mask = self.real_defects[int(rng.integers(len(self.real_defects)))]
        ys, xs = np.nonzero(mask)
        cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (mask.shape[0] // 2, mask.shape[1] // 2)
        y0 = int(np.clip(cy - h // 2 + rng.integers(-h // 4, h // 4 + 1), 0, max(0, mask.shape[0] - h)))
        x0 = int(np.clip(cx - w // 2 + rng.integers(-w // 4, w // 4 + 1), 0, max(0, mask.shape[1] - w)))
        win = image[:, y0 : y0 + h, x0 : x0 + w].transpose(1, 2, 0)
        m = mask[y0 : y0 + h, x0 : x0 + w]
        if win.shape[:2] != (h, w):  # a defective part smaller than the input
            win = cv2.resize(np.ascontiguousarray(win), (w, h), interpolation=cv2.INTER_LINEAR)
            m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        if rng.random() < 0.5:
            return np.ascontiguousarray(win, dtype=np.float32), m.astype(np.float32)
        if rng.random() < 0.5:
            win, m = win[:, ::-1], m[:, ::-1]
        if h == w:
            k = int(rng.integers(4))
            win, m = np.rot90(win, k), np.rot90(m, k)
        dy, dx = (int(v) for v in rng.integers(-h // 4, h // 4 + 1, size=2))
        win, m = np.roll(win, (dy, dx), axis=(0, 1)), np.roll(m, (dy, dx), axis=(0, 1))
        mf = m.astype(np.float32)[..., None]
        pasted = original * (1.0 - mf) + win * mf
        return np.ascontiguousarray(pasted, dtype=np.float32), np.ascontiguousarray(m, dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        aug, original, mask, has = self.sample(i)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(aug.transpose(2, 0, 1))),
            "original": torch.from_numpy(np.ascontiguousarray(original.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None].copy()),
            "has_anomaly": torch.tensor(float(has), dtype=torch.float32),
        }


# -- deterministic data order -------------------------------------------------------
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of one epoch: a permutation that depends only on (seed, epoch); last partial batch dropped."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    bs = min(batch_size, n)
    return [perm[i : i + bs].tolist() for i in range(0, n - bs + 1, bs)]


def batch_stream(
    dataset: Any, batch_size: int, seed: int, start_step: int, num_workers: int
) -> Iterator[dict]:
    """Batches from global step ``start_step`` on, identical whether or not the run was resumed."""
    n = len(dataset)
    per_epoch = len(epoch_batches(n, batch_size, seed, 0))
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        dataset.set_epoch(epoch)
        batches = epoch_batches(n, batch_size, seed, epoch)[offset:]
        # A fresh loader per epoch: worker processes copy the dataset, so they must
        # start after set_epoch.
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            worker_init_fn=_worker_init if num_workers else None,
        )
        yield from loader
        epoch, offset = epoch + 1, 0


def _worker_init(_: int) -> None:
    # OpenCV's thread count is inherited from the parent (fixed by
    # ``single_threaded_opencv`` before any worker is forked): calling
    # cv2.setNumThreads here would tear down a pool copied mid-use and deadlock.
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def single_threaded_opencv() -> None:
    """Run OpenCV on one thread in this process, before any DataLoader worker forks.

    A worker forked while OpenCV's thread pool is live inherits the pool's locks but not
    its threads, and hangs in its first OpenCV call that touches the pool. Large images
    start the pool (a 256x256 bottle never does). Fixing the count in the parent, before
    the training images are decoded, means no pool thread is ever alive at a fork.
    Chosen over a spawn/forkserver context because those pickle the decoded training
    set into every worker each epoch.
    """
    import cv2

    cv2.setNumThreads(1)


def training_paths(cfg: dict[str, Any]) -> list[Path]:
    from .readers import open_dataset

    d = cfg["data"]
    if not d["root"]:
        raise ConfigError("data.root: no training data given (use --data CATEGORY_FOLDER)")
    ds = open_dataset(d["root"], split="train", layout=d["layout"], category=d["category"])
    paths = ds.good_paths()
    if not paths:
        raise ConfigError(f"{d['root']}: no good training images found")
    return paths


def resolve_geometry(cfg: dict[str, Any], paths: list[Path]) -> None:
    """Fix model.height/width and data.tile_scale from the training images (``geometry`` rules).

    Prints what the data look like and what was chosen; the config then holds concrete
    values, so a resumed run and the exported model use exactly this geometry.
    """
    d, m = cfg["data"], cfg["model"]
    stats = scan_images(paths)
    multiple = BACKBONE_SIZE_MULTIPLE if m["kind"] in BACKBONE_KINDS else SIZE_MULTIPLE
    geo = choose_geometry(
        stats, (m["height"], m["width"]), d["tile_scale"], whole_auto=d["aspect_size"], multiple=multiple
    )
    m["height"], m["width"] = geo.height, geo.width
    d["tile_scale"] = geo.tiling.scale if geo.tiling is not None else "off"
    d["aspect_size"] = False
    print(f"pouta-train: data: {stats.describe()}", flush=True)
    print(f"pouta-train: input: {geo.describe()}", flush=True)
    tiled = geo.tiling is not None
    asked = {key: m.get(key) for key in ("reconstruction_cue", "map_sigma_hw", *AUTO_WIDTHS)}
    resolve_auto_model(m, tiled, None if tiled else geo.axis_downscale)
    if m["kind"] not in ("pouta", "vanilla"):
        pass  # the reconstruction cue and discriminator widths are the autoencoder kinds'
    elif tiled and asked["reconstruction_cue"] == "auto":
        print(
            "pouta-train: reconstruction cue: off for tiled input "
            "(--set model.reconstruction_cue=true turns it on)",
            flush=True,
        )
    elif tiled and m["reconstruction_cue"]:
        print("pouta-train: reconstruction cue: on for tiled input, as set", flush=True)
    if tiled and m["kind"] == "pouta" and "auto" in (asked["disc_widths"], asked["fusion_width"]):
        print(
            f"pouta-train: discriminator: disc_widths {m['disc_widths']}, fusion_width "
            f"{m['fusion_width']} for tiled input (auto: {TILED_DISC_WIDEN}x the {m['preset']} preset's)",
            flush=True,
        )
    if asked["map_sigma_hw"] == "auto" and m["map_sigma_hw"] is not None:
        rows, cols = m["map_sigma_hw"]
        print(
            f"pouta-train: anomaly map: blurred round on the part, sigma {rows:g} rows, {cols:g} columns "
            f"(input px; the image score keeps sigma {m['map_sigma']:g} both ways)",
            flush=True,
        )
    warning = geo.small_defect_warning()
    if warning:
        print(f"pouta-train: warning: {warning}", flush=True)


def real_defects(folder: str | None, pre: Preprocessor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every defective image with a mask under ``folder`` (MVTec layout: ``test/<type>/`` or
    ``<type>/`` with ``ground_truth/<type>/<name>_mask.png``), at work size."""
    if not folder:
        return []
    from .readers import open_dataset

    root = Path(folder)
    ds = (
        open_dataset(root, split="test")
        if (root / "test").is_dir()
        else open_dataset(root.parent, split="test", category=root.name)
    )
    out = []
    for i, rec in enumerate(ds.records):
        if rec.label != 1:
            continue
        image, mask = ds.load(i, pre)
        if mask is not None and mask.any():
            out.append((image, mask))
    if not out:
        raise ConfigError(
            f"data.defects: {folder} has no defective image with a mask (expected MVTec layout: "
            "test/<defect>/<name>.png and ground_truth/<defect>/<name>_mask.png)"
        )
    return out


def build_training_set(
    cfg: dict[str, Any], mcfg: ModelConfig, paths: list[Path]
) -> tuple[Any, dict[str, Any]]:
    d = cfg["data"]
    pre = preprocessor_for_training(cfg, mcfg.height, mcfg.width)
    try:
        scfg = SynthesisConfig(**cfg["synthesis"])
    except TypeError as exc:
        raise ConfigError(f"synthesis: invalid field ({exc})") from None
    synth = AnomalySynthesizer(scfg, mcfg.height, mcfg.width)
    seed = int(cfg["train"]["seed"])
    info = {"data": str(d["root"]), "category": d["category"], "n_train_images": len(paths)}
    real = real_defects(d.get("defects"), pre)
    if real:
        info["n_real_defects"] = len(real)
        print(
            f"pouta-train: {len(real)} real defective parts from {d['defects']}: "
            f"{REAL_DEFECT_PROBABILITY:.0%} of samples (as they are, or their defect pasted on good parts)",
            flush=True,
        )
    dataset = TrainingSet(paths, pre, synth, seed, real)
    if pre.tiling is not None:
        work = {o.shape[:2] for o in dataset.originals}
        print(
            f"pouta-train: tiles: random {mcfg.width}x{mcfg.height} crops of {len(work)} work size(s)",
            flush=True,
        )
    return dataset, info
