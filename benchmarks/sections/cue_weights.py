"""PRN's cue weights, chosen on the validation split: the learned head's share of the fused map.

``pouta-bench --sections cue-weights --data ROOT`` takes each category's PRN that the quality
section trained (``OUT/quality/<category>/prn/model.pt``), scores every test image once per
head weight in ``HEAD_WEIGHTS`` (and once with the weights the checkpoint stores) through the
same tiles, stitching and pooled-max image score as ``pouta-eval``, and tabulates image AUROC
and recall at zero false rejects on the quality section's validation and report splits
(``cue_weights.md``, ``cue_weights.json``). The head weight with the best mean validation
AUROC (ties: recall) is ``chosen``; ``pouta.trainer.models.prn.HEAD_WEIGHT`` is what PRN
ships with (a test compares them).

Each image runs the model once: the two cues' maps are scaled by their fitted normal levels
(``PRN.cue_maps``) and every weighting is a weighted sum of those two maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..common import Result, log
from .quality import SPLIT_METRICS, SPLITS, find_categories, split_metrics

HEAD_WEIGHTS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
STORED = "stored"  # the weights in the checkpoint (fitted or fixed when it was trained)
BATCH = 8


def option_names() -> list[str]:
    return [f"{w:g}" for w in HEAD_WEIGHTS] + [STORED]


def score_category(checkpoint: Path, category: Path) -> dict[str, list[dict[str, Any]]]:
    """{option: [{path, label, score}] per test image} for one PRN checkpoint."""
    import torch
    from pouta.edge.contract.geometry import pooled_max
    from pouta.trainer.checkpoint import load_model
    from pouta.trainer.data.readers import open_dataset
    from pouta.trainer.geometry import preprocessor_for_training

    model, cfg, info = load_model(checkpoint)
    if cfg.kind != "prn" or cfg.cue_scales is None:
        raise ValueError(
            f"{checkpoint}: expected a trained prn checkpoint with fitted cues, got kind {cfg.kind}"
        )
    model = model.to(memory_format=torch.channels_last)
    pre = preprocessor_for_training(info["train_config"], int(cfg.height), int(cfg.width))
    dataset = open_dataset(category, split="test")
    stored_head = (cfg.cue_weights or (0.5, 0.5))[0]
    weights = {f"{w:g}": w for w in HEAD_WEIGHTS} | {STORED: stored_head}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in weights}
    n = len(dataset.records)
    for i, rec in enumerate(dataset.records):
        img, _ = dataset.load(i, pre)
        geo = pre.geometry_of_work(img.shape[1:])
        tiles = np.ascontiguousarray(geo.cut(img), dtype=np.float32)
        heads, dists = [], []
        for k in range(0, len(tiles), BATCH):
            x = torch.from_numpy(tiles[k : k + BATCH]).contiguous(memory_format=torch.channels_last)
            a, r = model.cue_maps(x)
            heads.append(a[:, 0].numpy())
            dists.append(r[:, 0].numpy())
        head, dist = geo.stitch(np.concatenate(heads)), geo.stitch(np.concatenate(dists))
        for name, w in weights.items():
            score = pooled_max(w * head + (1.0 - w) * dist)
            out[name].append({"path": str(rec.path), "label": int(rec.label), "score": score})
        if (i + 1) % 50 == 0 or i + 1 == n:
            log(f"cue-weights: {category.name}: {i + 1}/{n} images")
    return out


def run_cue_weights(data_root: Path, quality_dir: Path, out: Path) -> Result:
    """Every category under ``data_root`` with a PRN in ``quality_dir``; writes the tables."""
    categories = [
        c for c in find_categories(data_root) if (quality_dir / c.name / "prn" / "model.pt").is_file()
    ]
    if not categories:
        raise FileNotFoundError(
            f"{quality_dir}: no <category>/prn/model.pt for the categories under {data_root} "
            "(run --sections quality --quality-kinds prn first)"
        )
    rows: dict[str, dict[str, Any]] = {}
    for category in categories:
        ckpt = quality_dir / category.name / "prn" / "model.pt"
        log(f"cue-weights: {category.name}: {ckpt}")
        scored = score_category(ckpt, category)
        rows[category.name] = {name: split_metrics(per_image) for name, per_image in scored.items()}
    res: Result = {"head_weights": list(HEAD_WEIGHTS), "categories": rows, **summarise(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cue_weights.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / "cue_weights.md").write_text("\n".join(markdown(res)) + "\n", encoding="utf-8")
    return res


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over categories per option and split, and the chosen head weight (validation)."""
    means: dict[str, dict[str, dict[str, float | None]]] = {}
    for name in option_names():
        means[name] = {}
        for split in SPLITS:
            means[name][split] = {}
            for metric in SPLIT_METRICS:
                vals = [r[name][split][metric] for r in rows.values() if r[name][split][metric] is not None]
                means[name][split][metric] = float(np.mean(vals)) if vals else None

    def key(name: str) -> tuple[float, float]:
        val = means[name]["val"]
        return (round(val["image_auroc"] or 0.0, 4), round(val["recall_at_zero_fr"] or 0.0, 4))

    chosen = max((f"{w:g}" for w in HEAD_WEIGHTS), key=key)
    return {"means": means, "chosen": float(chosen)}


def markdown(res: Result) -> list[str]:
    cats = list(res["categories"])

    def cell(m: dict[str, Any]) -> str:
        auc, rec = m["image_auroc"], m["recall_at_zero_fr"]
        return "-" if auc is None else f"{auc:.3f} / {rec:.2f}"

    lines = [
        "PRN cue weights: image AUROC / recall at zero false rejects per head weight (the learned "
        "head's share of the fused map; the patch distance gets the rest). Chosen on the validation "
        f"split: head weight **{res['chosen']:g}**. `{STORED}`: the weights each checkpoint was trained with.",
        "",
    ]
    for split in SPLITS:
        lines += [
            f"**{split} split**",
            "",
            "| head weight | " + " | ".join(cats) + " | mean |",
            "|---|" + "---|" * (len(cats) + 1),
        ]
        for name in option_names():
            cells = [cell(res["categories"][c][name][split]) for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell(res['means'][name][split])} |")
        lines.append("")
    return lines
