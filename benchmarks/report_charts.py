"""The report's PNG charts (cost, latency, accuracy), drawn from ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import KINDS, PAPER, Result
from .report import STATUS_OK


def write_charts(res: Result, out: Path) -> dict[str, str]:
    """PNG charts beside the report; returns their file names (relative to ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    secs = res.get("sections", {})
    for key, fn in (("cost", _cost_chart), ("latency", _latency_chart), ("accuracy", _accuracy_chart)):
        sec = secs.get(key, {})
        if sec.get("status") not in STATUS_OK:
            continue
        fig = fn(plt, sec)
        if fig is None:
            continue
        name = f"{key}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made[key] = name
    return made


def _cost_chart(plt: Any, sec: Result) -> Any:
    rows = sec.get("rows", {})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(KINDS)
    x = range(len(labels))
    w = 0.27
    params = [rows.get(k, {}).get("params", 0) / 1e6 for k in labels]
    axes[0].bar([i - w / 2 for i in x], params, w, label=f"ours ({sec.get('preset')})")
    axes[0].bar([i + w / 2 for i in x], [PAPER[k]["params"] / 1e6 for k in labels], w, label="paper")
    axes[0].set_title("Params (M)")
    macs = [rows.get(k, {}).get("macs", 0) / 1e9 for k in labels]
    flops = [rows.get(k, {}).get("flops", 0) / 1e9 for k in labels]
    axes[1].bar([i - w for i in x], macs, w, label="ours: MACs")
    axes[1].bar(list(x), flops, w, label="ours: FLOPs (2xMAC)")
    axes[1].bar([i + w for i in x], [PAPER[k]["flops"] / 1e9 for k in labels], w, label="paper 'FLOPs'")
    axes[1].set_title(f"GMACs / GFLOPs at {sec.get('height')}x{sec.get('width')}, batch 1")
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.legend(fontsize=8)
    return fig


def _latency_chart(plt: Any, sec: Result) -> Any:
    """One panel per batch size (their scales differ by the batch factor), backends side by side."""
    batches = [str(b) for b in sec.get("batches", [])]
    panels = []
    for b in batches:
        bars = []
        for name, be in sec.get("backends", {}).items():
            r = be.get("batches", {}).get(b, {}) if be.get("status") in STATUS_OK else {}
            p, v = r.get("pouta", {}), r.get("vanilla", {})
            if "median_ms" in p or "median_ms" in v:
                bars.append((name, p, v, r.get("ratio_median")))
        if bars:
            panels.append((b, bars))
    if not panels:
        return None
    width = max(6.0, 1.4 * max(len(bars) for _, bars in panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.6 * len(panels)), squeeze=False)
    w = 0.38
    for ax, (b, bars) in zip(axes[:, 0], panels, strict=True):
        for off, idx, label in ((-w / 2, 1, "POUTA"), (w / 2, 2, "vanilla")):
            med = [bar[idx].get("median_ms", 0) for bar in bars]
            err = [max(0.0, bar[idx].get("p99_ms", 0) - bar[idx].get("median_ms", 0)) for bar in bars]
            x = [i + off for i in range(len(bars))]
            ax.bar(x, med, w, yerr=[[0] * len(err), err], capsize=3, label=label)
        for i, bar in enumerate(bars):
            if bar[3] is not None:
                top = max(bar[1].get("p99_ms", 0), bar[2].get("p99_ms", 0))
                ax.text(i, top * 1.03, f"{bar[3]:.2f}", ha="center", fontsize=8)
        ax.set_xticks(range(len(bars)), [bar[0] for bar in bars], fontsize=8)
        ax.set_ylabel(f"ms per batch of {b}")
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(
        f"Latency at {sec.get('height')}x{sec.get('width')}, {sec.get('threads')} threads: median, whisker p99; "
        "label = POUTA/vanilla",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _accuracy_chart(plt: Any, sec: Result) -> Any:
    pts = [
        (name, r)
        for name, r in sec.get("rows", {}).items()
        if isinstance(r.get("pixel_ap"), float) and isinstance(r.get("macs"), float)
    ]
    if not pts:
        return None
    use_latency = all(isinstance(r.get("ort_cpu_b1_median_ms"), float) for _, r in pts if "ort" in _)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in pts:
        x0 = r["macs"] / 1e9
        axes[0].scatter(x0, r["image_auroc"] or 0)
        axes[0].annotate(name, (x0, r["image_auroc"] or 0), fontsize=7)
        lat = r.get("ort_cpu_b1_median_ms")
        if use_latency and isinstance(lat, float):
            axes[1].scatter(lat, r["pixel_ap"])
            axes[1].annotate(name, (lat, r["pixel_ap"]), fontsize=7)
    axes[0].set_xlabel("GMACs")
    axes[0].set_ylabel("image AUROC")
    axes[1].set_xlabel("ONNX Runtime CPU batch-1 latency (ms)")
    axes[1].set_ylabel("pixel AP")
    fig.suptitle("Accuracy vs cost")
    return fig
