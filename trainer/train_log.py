"""The training log (``train_log.jsonl``, one JSON row per logged step) and its loss plot."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint being resumed (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


def plot_losses(log_path: Path, png: Path) -> None:
    rows = []
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    # every loss part the kind logs (POUTA: mse, ssim, pre, mss; PRN: smooth_l1, focal)
    keys = [k for k in rows[-1] if k not in ("step", "lr", "elapsed_s")]
    for key in keys:
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
