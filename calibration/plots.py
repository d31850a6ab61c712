"""Score histogram (normal vs defective, the chosen threshold drawn): the picture a line
engineer checks after calibration, and the one an evaluation report carries."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pouta.edge.fsutil import atomic_write_bytes


def save_score_histogram(
    path: str | os.PathLike[str],
    normal: Sequence[float] | np.ndarray,
    threshold: float | None,
    defect: Sequence[float] | np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Write the histogram PNG atomically; ``threshold`` None draws no threshold line."""
    import matplotlib

    # Agg: build boxes and Jetsons have no display.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
