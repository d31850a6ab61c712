"""Pictures of scores: the histogram (normal vs defective, the chosen threshold drawn) a line
engineer checks after calibration, and the operating-point figure a quality engineer signs."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pouta.edge.contract.fsutil import atomic_write_bytes

from .operating_point import HeldOut, curves, roc

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GOOD_COLOUR, DEFECT_COLOUR = "tab:blue", "tab:red"


def _pyplot() -> Any:
    import matplotlib

    # Agg: build boxes and Jetsons have no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_score_histogram(
    path: str | os.PathLike[str],
    normal: Sequence[float] | np.ndarray,
    threshold: float | None,
    defect: Sequence[float] | np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Write the histogram PNG atomically; ``threshold`` None draws no threshold line."""
    plt = _pyplot()
    n = np.asarray(normal, dtype=np.float64)
    d = np.asarray(defect if defect is not None else [], dtype=np.float64)
    both = np.concatenate([n, d, [] if threshold is None else [threshold]])
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1e-3
    bins = np.linspace(lo, hi, 41)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.hist(n, bins=bins, alpha=0.6, label=f"normal (n={n.size})", color="tab:blue")
        if d.size:
            ax.hist(d, bins=bins, alpha=0.6, label=f"defect (n={d.size})", color="tab:red")
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.set_xlabel("image score")
        ax.set_ylabel("images")
        ax.set_title(title or "calibration scores")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue(), fsync=False)


def _shares(x: np.ndarray) -> np.ndarray:
    """Histogram weights that make each set's bars sum to 1: sets of 10 and 600 parts compare."""
    return np.full(x.size, 1.0 / max(x.size, 1))


def operating_point_figure(
    threshold: float,
    calib_good: np.ndarray,
    held: HeldOut,
    confidence: float,
    target: tuple[str, float] | None = None,
    title: str = "",
    thumbs: tuple[list[tuple[np.ndarray, str]], list[tuple[np.ndarray, str]]] = ([], []),
) -> Figure:
    """Distributions, ROC with the chosen point, rates against the threshold with exact bands,
    and the nearest misses on both sides (``thumbs``: (RGB image, caption) per part).

    ``target`` is (``"false_reject"`` or ``"escape"``, rate) for the objective's line."""
    plt = _pyplot()
    good, bad = held.good, held.defect
    n_thumb = max(len(thumbs[0]), len(thumbs[1]), 1)
    fig = plt.figure(figsize=(13, 10.5 if any(thumbs) else 7.5), dpi=100)
    rows = [3.2, 1.25, 1.25] if any(thumbs) else [1.0]
    grid = fig.add_gridspec(len(rows), 1, height_ratios=rows, hspace=0.35)
    top = grid[0].subgridspec(1, 3, wspace=0.28)

    ax = fig.add_subplot(top[0])
    both = np.concatenate([calib_good, good, bad, [threshold]])
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-9, 41)
    ax.hist(
        calib_good,
        bins=bins,
        histtype="step",
        weights=_shares(calib_good),
        color=GOOD_COLOUR,
        linestyle=":",
        label=f"good, calibration (n={calib_good.size})",
    )
    if good.size:
        ax.hist(
            good,
            bins=bins,
            weights=_shares(good),
            alpha=0.5,
            color=GOOD_COLOUR,
            label=f"good, held out (n={good.size})",
        )
    if bad.size:
        ax.hist(
            bad,
            bins=bins,
            weights=_shares(bad),
            alpha=0.5,
            color=DEFECT_COLOUR,
            label=f"defective, held out (n={bad.size})",
        )
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(
        xlabel="image score (NG above the threshold)",
        ylabel="share of the set's parts",
        title="score distributions",
    )
    ax.legend(fontsize=7, loc="best")

    ax = fig.add_subplot(top[1])
    ax.set(xlabel="false-reject rate (good parts rejected)", ylabel="detection rate (1 - escape rate)")
    ax.set_title("ROC on the held-out parts")
    if good.size and bad.size:
        fpr, tpr, _ = roc(good, bad)
        ax.plot(fpr, tpr, color="tab:purple", drawstyle="steps-post", label="ROC", gid="roc")
        fr, det = float(np.mean(good > threshold)), float(np.mean(bad > threshold))
        ax.plot(
            [fr],
            [det],
            "o",
            color="black",
            markersize=8,
            label=f"chosen: {fr:.1%} FR, {1 - det:.1%} escapes",
            gid="chosen",
        )
        ax.plot([0, 1], [0, 1], color="0.8", linewidth=0.8)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(
            0.5,
            0.5,
            "needs labelled good and defective\nheld-out parts (--holdout test/)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)

    ax = fig.add_subplot(top[2])
    ref = good if good.size else calib_good
    c = curves(ref, bad, confidence)
    ax.plot(c.thresholds, c.false_reject, color=GOOD_COLOUR, label="false-reject rate", gid="false_reject")
    ax.fill_between(
        c.thresholds,
        c.false_reject_band[:, 0],
        c.false_reject_band[:, 1],
        color=GOOD_COLOUR,
        alpha=0.2,
        label=f"{100 * confidence:.3g}% interval",
    )
    if bad.size:
        ax.plot(c.thresholds, c.escape, color=DEFECT_COLOUR, label="escape rate", gid="escape")
        ax.fill_between(
            c.thresholds, c.escape_band[:, 0], c.escape_band[:, 1], color=DEFECT_COLOUR, alpha=0.2
        )
    ax.axvline(threshold, color="black", linestyle="--")
    if target is not None:
        colour = GOOD_COLOUR if target[0] == "false_reject" else DEFECT_COLOUR
        what = "false rejects" if target[0] == "false_reject" else "escapes"
        ax.axhline(target[1], color=colour, linestyle=":", label=f"target {what} {target[1]:.3g}")
    ax.set(xlabel="threshold", ylabel="rate", ylim=(-0.02, 1.02), title="rates against the threshold")
    ax.legend(fontsize=7, loc="center right")

    for row, (items, side) in enumerate(
        zip(thumbs, ("good parts nearest rejection", "defective parts nearest escape"), strict=True)
    ):
        if not items:
            continue
        strip = grid[1 + row].subgridspec(1, n_thumb, wspace=0.08)
        for i, (img, caption) in enumerate(items):
            tax = fig.add_subplot(strip[i])
            tax.imshow(img)
            tax.set_xticks([])
            tax.set_yticks([])
            tax.set_xlabel(caption, fontsize=7)
            if i == 0:
                tax.set_ylabel(side, fontsize=8)
    fig.suptitle(title, fontsize=11, y=0.93)
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return buf.getvalue()
