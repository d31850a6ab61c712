"""Quality over every real category: every model kind (and ablation rows), same CPU budget, defaults.

``pouta-bench --sections quality --data ROOT`` finds every MVTec-layout category under
ROOT (a folder with ``train/good``, up to two levels down), and for each one runs exactly
the commands README gives for a new category, with default settings:

    pouta-train --data CATEGORY --kind KIND --time-limit-min M --out OUT
    pouta-eval  --checkpoint OUT/model.pt --data CATEGORY --out OUT/eval

then tabulates image AUROC, pixel AUROC, pixel AP, AUPRO, training steps and seconds
(``quality.md``, ``quality.json``, ``quality.png``).

Each category's test images are cut once, by a hash of their path, into a **validation**
third (``split_of``), on which defaults are chosen, and a **report** two thirds, on which
they are reported: ``image_auroc`` and ``recall_at_zero_fr`` (the share of defective parts
scored above every good part, what a line catches when it may reject no good part) are
given on both, and the report split is what README and the docs quote. Pixel metrics are
over the whole test set. A category whose report already exists
for the same command and the same trainer and runtime code (``code_fingerprint``) is not
run again, so an interrupted run continues where it stopped, and a change of code or
defaults trains again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..common import Result, log
from .accuracy import run_training

KINDS = ("pouta", "vanilla", "prn", "features", "prn+defects", "redi", "redi-hip", "redi-ls", "redi-frb")
# Ablation rows: (kind trained, its config overrides): the paper's ablation table (ReDi
# without HIP (the raw image to the recover network), without L_S, without the FRB).
ABLATION_ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "redi-hip": ("redi", ("model.redi_hip=false",)),
    "redi-ls": ("redi", ("model.redi_self_correlation=false",)),
    "redi-frb": ("redi", ("model.redi_frb=false",)),
}
FEW_DEFECTS = 5  # real defective parts a "+defects" row trains on (taken out of the test set)
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
SPLIT_METRICS = ("image_auroc", "recall_at_zero_fr")
SPLITS = ("val", "report")
VALIDATION_SHARE = 3  # one test image in this many goes to the validation split


def split_of(path: str) -> str:
    """``val`` or ``report`` for a test image, from the last three parts of its path
    (test/defect type/file): the same on every machine and checkout."""
    key = "/".join(Path(path).parts[-3:]).encode()
    return "val" if int(hashlib.sha256(key).hexdigest(), 16) % VALIDATION_SHARE == 0 else "report"


def split_metrics(scores: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """{split: {image_auroc, recall_at_zero_fr, n_good, n_defective}} from an eval report's
    per-image ``scores`` (path, label, score)."""
    from pouta.trainer.metrics import roc_auc

    out: dict[str, dict[str, float | None]] = {}
    for split in (*SPLITS, "all"):
        rows = [r for r in scores if split == "all" or split_of(r["path"]) == split]
        good = [float(r["score"]) for r in rows if int(r["label"]) == 0]
        bad = [float(r["score"]) for r in rows if int(r["label"]) == 1]
        if not good or not bad:
            out[split] = {
                "image_auroc": None,
                "recall_at_zero_fr": None,
                "n_good": len(good),
                "n_defective": len(bad),
            }
            continue
        labels = [0] * len(good) + [1] * len(bad)
        import numpy as np

        auroc = roc_auc(np.array(labels), np.array(good + bad, dtype=np.float64))
        recall = sum(1 for b in bad if b > max(good)) / len(bad)
        out[split] = {
            "image_auroc": auroc,
            "recall_at_zero_fr": recall,
            "n_good": len(good),
            "n_defective": len(bad),
        }
    return out


def find_categories(root: Path) -> list[Path]:
    """MVTec-layout category folders at ``root`` or up to two levels below it, sorted by name."""
    if (root / "train" / "good").is_dir():
        return [root]
    found = [p for p in sorted(root.glob("*")) if (p / "train" / "good").is_dir()]
    found += [p for p in sorted(root.glob("*/*")) if (p / "train" / "good").is_dir()]
    return sorted(found, key=lambda p: p.name)


def commands(
    category: Path, kind: str, minutes: float, out: Path, defects: Path | None = None
) -> tuple[list[str], list[str]]:
    kind, sets = ABLATION_ROWS.get(kind, (kind, ()))
    train = [sys.executable, "-m", "pouta.trainer.train", "--data", str(category), "--kind", kind]
    for setting in sets:
        train += ["--set", setting]
    train += ["--time-limit-min", f"{minutes:g}", "--out", str(out), "--no-progress"]
    if defects is not None:
        train += ["--defects", str(defects)]
    evaluate = [sys.executable, "-m", "pouta.trainer.evaluate", "--checkpoint", str(out / "model.pt")]
    evaluate += ["--data", str(category), "--out", str(out / "eval"), "--no-progress"]
    return train, evaluate


def code_fingerprint() -> str:
    """Hash of the code and packaged defaults a quality row depends on (trainer and runtime).

    By content, not path or commit: another checkout of the same code gives the same hash,
    an edited default (a config, a geometry rule) a different one.
    """
    import pouta.edge
    import pouta.trainer

    digest = hashlib.sha256()
    for package in (pouta.trainer, pouta.edge):
        root = Path(package.__file__).parent
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml")):
            digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def reusable(row: Result, train_cmd: list[str], fingerprint: str) -> bool:
    """A finished row answers for this run: same command (any interpreter), same code."""
    same_command = shlex.split(str(row.get("train_command", "")))[1:] == train_cmd[1:]
    return same_command and row.get("code") == fingerprint


FEW_DEFECTS_SUFFIX = "+defects"  # a kind name with this suffix trains with a few real defects


def few_defects_split(category: Path, n: int, out: Path) -> tuple[Path, Path] | None:
    """(category without them, folder of them): ``n`` defective test images with masks,
    chosen from the validation split by path hash, moved (as symlinks) to a ``--defects``
    folder in MVTec layout; the category copy links everything else, so they are never
    scored. None for a category without masks."""
    gt = category / "ground_truth"
    if not gt.is_dir():
        return None
    candidates = sorted(
        (p for p in (category / "test").glob("*/*") if p.parent.name != "good" and split_of(str(p)) == "val"),
        key=lambda p: hashlib.sha256("/".join(p.parts[-3:]).encode()).hexdigest(),
    )
    chosen = [p for p in candidates if any((gt / p.parent.name).glob(f"{p.stem}*"))][:n]
    data, defects = out / "data" / category.name, out / "defects"
    for root in (data, defects):
        if root.exists():
            import shutil

            shutil.rmtree(root)
    (data / "train").mkdir(parents=True)
    (data / "train" / "good").symlink_to((category / "train" / "good").resolve())
    (data / "ground_truth").symlink_to(gt.resolve())
    for img in sorted((category / "test").glob("*/*")):
        target = (defects if img in chosen else data) / "test" / img.parent.name / img.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(img.resolve())
    (defects / "ground_truth").symlink_to(gt.resolve())
    return data, defects


def run_one(category: Path, kind: str, minutes: float, out: Path, defects: Path | None = None) -> Result:
    """Train and evaluate one (category, kind); reuse a finished run of the same command and code."""
    train_cmd, eval_cmd = commands(category, kind, minutes, out, defects)
    fingerprint = code_fingerprint()
    done = out / "quality_row.json"
    if done.is_file():
        row = json.loads(done.read_text(encoding="utf-8"))
        if reusable(row, train_cmd, fingerprint):
            log(f"quality: {category.name}/{kind}: reusing {done}")
            return row
        log(f"quality: {category.name}/{kind}: {done} is from another command or code: training again")
    out.mkdir(parents=True, exist_ok=True)
    log(f"quality: {category.name}/{kind}: {shlex.join(train_cmd)}")
    train_s = run_training(train_cmd, out, f"quality: training {category.name}/{kind}")
    t0 = time.perf_counter()
    proc = subprocess.run(eval_cmd, capture_output=True, text=True)
    eval_s = time.perf_counter() - t0
    (out / "eval.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(
            f"pouta-eval on {category} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    report = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    row: Result = {
        "category": category.name,
        "kind": kind,
        **{m: report.get(m) for m in METRICS},
        "splits": split_metrics(report.get("scores") or []),
        "steps": summary.get("steps"),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "input": {k: report.get(k) for k in ("input_size", "tiling", "tiles_per_image", "map_size")},
        "counts": report.get("counts"),
        "train_command": shlex.join(train_cmd),
        "eval_command": shlex.join(eval_cmd),
        "code": fingerprint,
    }
    done.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    log(f"quality: {category.name}/{kind}: " + ", ".join(f"{m} {_fmt(row[m])}" for m in METRICS))
    return row


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _mean(rows: list[Result], kind: str, metric: str) -> float | None:
    vals = [row_metric(r, metric) for r in rows if r["kind"] == kind]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def row_metric(row: Result, metric: str) -> float | None:
    """A row's metric; ``SPLIT/metric`` (e.g. ``report/image_auroc``) reads a split's."""
    if "/" in metric:
        split, name = metric.split("/", 1)
        return ((row.get("splits") or {}).get(split) or {}).get(name)
    return row.get(metric)


SPLIT_COLUMNS = tuple(f"{split}/{m}" for split in SPLITS for m in SPLIT_METRICS)


def run_quality(root: Path, out: Path, minutes: float, kinds: tuple[str, ...] = KINDS) -> Result:
    categories = find_categories(root)
    if not categories:
        raise FileNotFoundError(f"{root}: no MVTec-layout category (a folder with train/good) found")
    log(
        f"quality: {len(categories)} categories x {len(kinds)} models x {minutes:g} min: "
        + ", ".join(c.name for c in categories)
    )
    rows: list[Result] = []
    for category in categories:
        for kind in kinds:
            if kind.endswith(FEW_DEFECTS_SUFFIX):
                split = few_defects_split(category, FEW_DEFECTS, out / category.name / kind)
                if split is None:
                    log(f"quality: {category.name}/{kind}: no masks, no real defects to train on: skipped")
                    continue
                row = run_one(
                    split[0],
                    kind.removesuffix(FEW_DEFECTS_SUFFIX),
                    minutes,
                    out / category.name / kind,
                    split[1],
                )
                row.update(category=category.name, kind=kind)
                rows.append(row)
            else:
                rows.append(run_one(category, kind, minutes, out / category.name / kind))
            write_outputs(rows, out, minutes)
    return write_outputs(rows, out, minutes)


def write_outputs(rows: list[Result], out: Path, minutes: float) -> Result:
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: KINDS.index(k) if k in KINDS else 9)
    # a "+defects" row is scored on a test set without its 5 training defects: compare it
    # with its kind's row on the same categories only
    means = {k: {m: _mean(rows, k, m) for m in (*METRICS, *SPLIT_COLUMNS)} for k in kinds}
    # Kinds compare only over the categories every one of them ran.
    common = (
        set.intersection(*({r["category"] for r in rows if r["kind"] == k} for k in kinds))
        if kinds
        else set()
    )
    shared = [r for r in rows if r["category"] in common]
    common_means = {k: {m: _mean(shared, k, m) for m in (*METRICS, *SPLIT_COLUMNS)} for k in kinds}
    res: Result = {
        "minutes": minutes,
        "rows": rows,
        "means": means,
        "common_categories": sorted(common),
        "common_means": common_means,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / "quality.md").write_text("\n".join(markdown(res)) + "\n", encoding="utf-8")
    with contextlib.suppress(ImportError):
        chart(res, out / "quality.png")
    return res


def markdown(res: Result) -> list[str]:
    lines = [
        f"Quality, {res['minutes']:g} CPU minutes per model, default settings. Image AUROC and recall at "
        "zero false rejects on the report split (two thirds of each test set, never used to choose a "
        "default) and on the validation split (the other third); pixel metrics on the whole test set.",
        "",
        "| category | model | image AUROC (report) | recall @ 0 FR (report) | image AUROC (val) "
        "| recall @ 0 FR (val) | image AUROC (all) | pixel AUROC | pixel AP | AUPRO | steps | train s | input |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cols = (
        "report/image_auroc",
        "report/recall_at_zero_fr",
        "val/image_auroc",
        "val/recall_at_zero_fr",
        *METRICS,
    )
    for r in res["rows"]:
        inp = r.get("input") or {}
        tiling = inp.get("tiling")
        geo = f"{inp.get('tiles_per_image')} tiles @ {tiling['scale']:.3g}" if tiling else "whole image"
        lines.append(
            f"| {r['category']} | {r['kind']} | "
            + " | ".join(_fmt(row_metric(r, m)) for m in cols)
            + f" | {r.get('steps')} | {r.get('train_seconds'):.0f} | {geo} |"
        )
    for kind, m in res["means"].items():
        lines.append(f"| **mean** | {kind} | " + " | ".join(_fmt(m.get(k)) for k in cols) + " | | | |")
    if (
        len(res["means"]) > 1
        and res.get("common_categories")
        and len(res["common_categories"]) < len({r["category"] for r in res["rows"]})
    ):
        for kind, m in res["common_means"].items():
            lines.append(
                f"| **mean of {len(res['common_categories'])} common** | {kind} | "
                + " | ".join(_fmt(m.get(k)) for k in cols)
                + " | | | |"
            )
    return lines


def chart(res: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(dict.fromkeys(r["category"] for r in res["rows"]))
    kinds = list(res["means"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for ax, metric in zip(axes, ("image_auroc", "pixel_auroc"), strict=True):
        width = 0.8 / max(1, len(kinds))
        for k, kind in enumerate(kinds):
            vals = [
                next(
                    (r.get(metric) or 0.0 for r in res["rows"] if r["category"] == c and r["kind"] == kind),
                    0.0,
                )
                for c in cats
            ]
            ax.bar([i + k * width for i in range(len(cats))], vals, width, label=kind)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=20, fontsize=8)
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
