"""``pouta-eval``: image AUROC, pixel AUROC/AP, AUPRO, per-defect-type breakdown, report.

``evaluate`` is scorer-agnostic: a scorer is any callable taking a [N,3,H,W] float32 batch
and returning (anomaly maps, image scores), so PyTorch checkpoints, ONNX models and the
edge runtime are measured by the same code. Only ``torch_scorer`` imports torch, lazily.

With ``out_dir`` it writes ``report.json``, ``score_histogram.png`` (good vs defective)
and overlays (input | heatmap | heatmap on input | ground truth) of the worst false
positives (highest-scoring good images) and false negatives (lowest-scoring defective).

Longer than ~350 lines on purpose: the evaluation, its overlays and the ``pouta-eval``
command are one tool and change together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pouta.calibration.thresholds.plots import save_score_histogram
from pouta.edge.contract.errors import PoutaError
from pouta.edge.contract.geometry import FrameGeometry, score_frames
from pouta.edge.contract.overlay import draw_overlay, to_bgr8
from pouta.edge.contract.preprocess import Preprocessor
from pouta.edge.contract.settings import add_config_args, hw_arg, settings_or_exit

from .data.readers import InspectionDataset, open_dataset
from .metrics import aupro, average_precision, pixel_metrics, roc_auc

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
NO_MASKS_NOTE = "no ground_truth/: pixel metrics skipped"
OVERLAY_QUANTILE = 0.999


def _num(x: float | None) -> float | None:
    """JSON-safe metric: NaN (undefined, e.g. one class only) becomes None."""
    if x is None or not math.isfinite(float(x)):
        return None
    return float(x)


def progress_bar(enabled: bool, total: int, desc: str, unit: str, initial: int = 0) -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm is missing (training and evaluation)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def _common_size(work_maps: list[np.ndarray]) -> np.ndarray:
    """Stack work-size maps; images of several sizes are brought to the median size first."""
    shapes = {m.shape for m in work_maps}
    if len(shapes) == 1:
        return np.stack(work_maps)
    hs, ws = zip(*shapes, strict=True)
    th, tw = int(np.median(hs)), int(np.median(ws))
    return np.stack([cv2.resize(m, (tw, th), interpolation=cv2.INTER_LINEAR) for m in work_maps])


def _resize_mask(mask: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    if mask.shape == tuple(hw):
        return mask
    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) > 0


def _pixel_block(maps: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    pm = pixel_metrics(maps, masks)
    return {
        "pixel_auroc": _num(pm.auroc),
        "pixel_ap": _num(pm.ap),
        "aupro": _num(aupro(maps, masks)),
        "pixel_method": pm.method,
    }


def _safe_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{path.parent.name}_{path.stem}")


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _overlay_png(
    path: Path, image_chw: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, level: float, score: float
) -> None:
    """input | overlay (tinted only from near ``level`` up, as the runtime's) | ground truth.

    Panels are side by side, or stacked for wide images (fabric webs, line scans).
    """
    bgr = to_bgr8(np.ascontiguousarray(image_chw.transpose(1, 2, 0)), "RGB")
    over = draw_overlay(bgr, amap, "", score, level, label=[f"score {score:.4f}"])
    if mask is None:
        gt = np.full_like(bgr, 64)
        gt_text = "no mask"
    else:
        m = _resize_mask(mask, bgr.shape[:2])
        gt = np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=-1)
        gt_text = "ground truth"
    wide = bgr.shape[1] > 2 * bgr.shape[0]
    sep = np.full((3, bgr.shape[1], 3) if wide else (bgr.shape[0], 3, 3), 255, np.uint8)
    panels = [_label(bgr, "input"), sep, _label(over, "overlay"), sep, _label(gt, gt_text)]
    if not cv2.imwrite(str(path), np.concatenate(panels, axis=0 if wide else 1)):
        raise OSError(f"{path}: could not write overlay PNG")


def evaluate(
    scorer: Scorer,
    dataset: InspectionDataset,
    pre: Preprocessor,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    n_worst: int = 4,
) -> dict[str, Any]:
    """Score every image of ``dataset`` and return the metrics (JSON-ready dict).

    Undefined metrics (one class only, no masks) are None. Defective images without a
    mask file count for image metrics only.
    """
    t0 = time.monotonic()
    n = len(dataset.records)
    h, w = pre.height, pre.width
    work_maps: list[np.ndarray] = []
    scores = np.empty(n, np.float32)
    masks: list[np.ndarray | None] = [None] * n
    n_tiles = 0
    bar = progress_bar(progress, n, f"eval {dataset.name}", "img")

    def frames() -> Iterator[tuple[np.ndarray, FrameGeometry]]:
        nonlocal n_tiles
        for i in range(n):
            img, masks[i] = dataset.load(i, pre)
            geo = pre.geometry_of_work(img.shape[1:])
            n_tiles += geo.n_tiles
            yield img, geo

    try:
        for i, (work_map, score) in enumerate(score_frames(scorer, frames(), batch_size)):
            work_maps.append(work_map)
            scores[i] = score
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    maps = _common_size(work_maps)
    masks = [None if m is None else _resize_mask(m, maps.shape[1:]) for m in masks]
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(maps))):
        raise PoutaError(f"{dataset.name}: the model produced NaN/inf scores or maps")

    labels = np.array([r.label for r in dataset.records], np.int64)
    types = np.array([r.defect_type for r in dataset.records])
    with_mask = np.array([m is not None for m in masks])
    report: dict[str, Any] = {
        "dataset": dataset.name,
        "layout": dataset.layout,
        "root": str(dataset.root),
        "split": dataset.split,
        "input_size": [h, w],
        "tiling": None if pre.tiling is None else {"scale": pre.tiling.scale, "overlap": pre.tiling.overlap},
        "tiles_per_image": round(n_tiles / max(1, n), 2),
        "map_size": list(maps.shape[1:]),
        "counts": dataset.counts(),
        "image_auroc": _num(roc_auc(labels, scores)),
        "pixel_auroc": None,
        "pixel_ap": None,
        "aupro": None,
        "pixel_method": None,
        "notes": [],
    }
    report["image_ap"] = _num(average_precision(labels, scores))
    if not dataset.has_masks:
        report["notes"].append(NO_MASKS_NOTE)
        print(f"pouta-eval: {dataset.name}: {NO_MASKS_NOTE}", file=sys.stderr)
    elif with_mask.any():
        stacked = np.stack([m for m in masks if m is not None])
        report.update(_pixel_block(maps[with_mask], stacked))
        if dataset.missing_masks:
            report["notes"].append(
                f"{len(dataset.missing_masks)} defective image(s) without a mask: image metrics only for them"
            )

    per_type: dict[str, dict[str, Any]] = {}
    good = labels == 0
    for t in dataset.defect_types:
        sel = types == t
        entry: dict[str, Any] = {
            "n": int(sel.sum()),
            "image_auroc": _num(roc_auc(labels[good | sel], scores[good | sel])),
            "mean_score": float(scores[sel].mean()),
        }
        if dataset.has_masks:
            keep = (good | sel) & with_mask
            if (sel & with_mask).any():
                entry.update(_pixel_block(maps[keep], np.stack([masks[i] for i in np.nonzero(keep)[0]])))
        per_type[t] = entry
    report["per_defect_type"] = per_type
    report["score_stats"] = {
        name: (
            {
                "mean": float(scores[sel].mean()),
                "min": float(scores[sel].min()),
                "max": float(scores[sel].max()),
            }
            if sel.any()
            else None
        )
        for name, sel in (("good", good), ("defective", ~good))
    }
    worst_fp = [int(i) for i in np.nonzero(good)[0][np.argsort(-scores[good], kind="stable")][:n_worst]]
    worst_fn = [int(i) for i in np.nonzero(~good)[0][np.argsort(scores[~good], kind="stable")][:n_worst]]
    report["worst_false_positives"] = [
        {"path": str(dataset.records[i].path), "score": float(scores[i])} for i in worst_fp
    ]
    report["worst_false_negatives"] = [
        {"path": str(dataset.records[i].path), "defect_type": str(types[i]), "score": float(scores[i])}
        for i in worst_fn
    ]
    report["scores"] = [
        {"path": str(r.path), "label": int(r.label), "defect_type": r.defect_type, "score": float(sc)}
        for r, sc in zip(dataset.records, scores, strict=True)
    ]
    report["seconds"] = round(time.monotonic() - t0, 3)

    if out_dir is not None:
        out = Path(out_dir)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        hist = out / "score_histogram.png"
        save_score_histogram(
            hist, scores[labels == 0], None, scores[labels == 1], f"{dataset.name}: image scores"
        )
        files.append(hist.name)
        # Tint from a high quantile of the good images' map values up: the level a
        # calibrated pixel threshold would sit near, so overlays show what the runtime would.
        level = float(np.quantile(maps[good] if good.any() else maps, OVERLAY_QUANTILE))
        report["overlay_level"] = level
        for tag, chosen in (("fp", worst_fp), ("fn", worst_fn)):
            for rank, i in enumerate(chosen):
                img, _ = dataset.load(i, pre)
                p = out / "overlays" / f"{tag}{rank:02d}_{_safe_name(dataset.records[i].path)}.png"
                _overlay_png(p, img, maps[i], masks[i], level, float(scores[i]))
                files.append(str(p.relative_to(out)))
        report["files"] = [*files, "report.json"]
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def torch_scorer(model: Any, device: str | Any = "cpu") -> Scorer:
    """Wrap a torch model whose forward returns ``.anomaly_map`` [N,1,H,W] and ``.score`` [N]."""
    import torch

    dev = torch.device(device)
    model.eval()
    # oneDNN's CPU convolutions (depthwise ones most) run faster on NHWC tensors
    fmt = torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    model.to(memory_format=fmt)

    def score(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
            out = model(t.contiguous(memory_format=fmt))
            return out.anomaly_map.float().cpu().numpy(), out.score.float().cpu().numpy()

    return score


def onnx_scorer(path: str | os.PathLike[str]) -> Scorer:
    """Run an ONNX model (input ``image``; outputs ``anomaly_map``, ``score``) on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def score(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, s = sess.run(["anomaly_map", "score"], {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return amap, s

    return score


def _summary(res: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"{res['dataset']} ({res['split']}, {res['counts']['good']} good / {res['counts']['defective']} defective): "
        f"image AUROC {f(res['image_auroc'])}, pixel AUROC {f(res['pixel_auroc'])}, "
        f"pixel AP {f(res['pixel_ap'])}, AUPRO {f(res['aupro'])}"
    ]
    for t, e in res["per_defect_type"].items():
        lines.append(
            f"  {t:<20} n={e['n']:<4} image AUROC {f(e['image_auroc'])}  pixel AUROC {f(e.get('pixel_auroc'))}"
        )
    lines.extend(f"  note: {n}" for n in res["notes"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pouta-eval", description="Evaluate a POUTA model on a test split.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint (.pt) written by pouta-train")
    src.add_argument("--onnx", help="exported ONNX model (its metadata .json sidecar gives the input size)")
    ap.add_argument("--data", required=True, help="dataset folder (category folder, or root with --category)")
    ap.add_argument("--category", default=None)
    ap.add_argument("--layout", default="auto", choices=["auto", "mvtec", "visa", "dagm", "folder"])
    ap.add_argument(
        "--size",
        type=hw_arg,
        default=None,
        help="whole-image input HxW, no tiling (default: the model's)",
    )
    ap.add_argument("--out", default=None, help="write report.json, histogram and overlays here")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="torch device for --checkpoint")
    ap.add_argument("--no-progress", action="store_true")
    add_config_args(ap, config_file=True)
    args = ap.parse_args(argv)
    settings_or_exit(ap, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.checkpoint:
            from .checkpoint import load_model
            from .geometry import preprocessor_for_training

            model, cfg, info = load_model(args.checkpoint, device=args.device)
            pre = preprocessor_for_training(info["train_config"], int(cfg.height), int(cfg.width))
            scorer = torch_scorer(model, args.device)
        else:
            from pouta.edge.contract.metadata import load_for_model
            from pouta.edge.contract.preprocess import preprocessor_for

            pre = preprocessor_for(load_for_model(args.onnx))
            scorer = onnx_scorer(args.onnx)
        if args.size is not None:
            pre = Preprocessor(*args.size)
        dataset = open_dataset(args.data, split="test", layout=args.layout, category=args.category)
        res = evaluate(
            scorer,
            dataset,
            pre,
            out_dir=args.out,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (PoutaError, OSError) as exc:
        print(f"pouta-eval: {exc}", file=sys.stderr)
        return 2
    print(_summary(res))
    if args.out:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
