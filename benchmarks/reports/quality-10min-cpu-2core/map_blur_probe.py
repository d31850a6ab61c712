"""The map blur round on the part vs round in input pixels, on one trained checkpoint.

``python map_blur_probe.py CHECKPOINT DATA [--out rows.jsonl]``

For each map blur (``map_sigma_hw`` as the checkpoint stores it, ``auto``'s choice, and
null = ``map_sigma`` both ways, the blur before ``model.map_sigma_hw``), on the same weights:
image AUROC and pixel AUROC / AP / AUPRO as ``pouta-eval`` measures them (``evaluate``,
masks resized to the map), and pixel AUROC / AP at the masks' own size (the map upsampled
bilinearly, as ``FrameGeometry.to_source`` does for the runtime's result files). The image
score does not depend on the map blur (``layers.map_smoothings``), so both rows must show
the same image AUROC. Whole-image models only.
"""

from __future__ import annotations

import argparse
import json
import sys

import cv2
import numpy as np
import torch
from pouta.edge.preprocess import Preprocessor, read_image, read_mask
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import InspectionDataset, open_dataset
from pouta.trainer.evaluate import evaluate, torch_scorer
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.metrics import pixel_metrics
from pouta.trainer.models import build_model
from pouta.trainer.models.layers import ModelOutput


def source_size_pixels(
    model: torch.nn.Module, dataset: InspectionDataset, pre: Preprocessor
) -> dict[str, float | None]:
    """Pixel AUROC / AP with every map upsampled to its mask's source size."""
    maps, masks = [], []
    for i, rec in enumerate(dataset.records):
        if rec.label == 1 and rec.mask_path is None:
            continue
        img, _ = dataset.load(i, pre)
        with torch.no_grad():
            out: ModelOutput = model(torch.from_numpy(img[None]), aux=False)
        amap = out.anomaly_map[0, 0].numpy()
        hw = read_image(rec.path).shape[:2]
        mask = np.zeros(hw, bool) if rec.label == 0 else read_mask(rec.mask_path)
        maps.append(cv2.resize(amap, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR).reshape(-1))
        masks.append(mask.reshape(-1))
    pm = pixel_metrics(np.concatenate(maps), np.concatenate(masks))
    return {"pixel_auroc_source": pm.auroc, "pixel_ap_source": pm.ap}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--out", default=None, help="append one JSON row per blur here")
    a = ap.parse_args(argv)
    model, cfg, info = load_model(a.checkpoint)
    pre = preprocessor_for_training(info["train_config"], int(cfg.height), int(cfg.width))
    if pre.tiling is not None:
        raise SystemExit(f"{a.checkpoint}: a tiled model; its map blur is round on the part already")
    dataset = open_dataset(a.data, split="test")
    rows = []
    for name, sigma_hw in (("as stored", cfg.map_sigma_hw), ("round in input px", None)):
        variant = build_model(cfg.with_(map_sigma_hw=sigma_hw)).eval()
        variant.load_state_dict(model.state_dict())
        res = evaluate(torch_scorer(variant), dataset, pre, progress=False)
        row = {
            "checkpoint": a.checkpoint,
            "steps": info.get("step"),
            "map_blur": name,
            "map_sigma": cfg.map_sigma,
            "map_sigma_hw": None if sigma_hw is None else list(sigma_hw),
            "image_auroc": res["image_auroc"],
            "pixel_auroc": res["pixel_auroc"],
            "pixel_ap": res["pixel_ap"],
            "aupro": res["aupro"],
            **source_size_pixels(variant, dataset, pre),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
