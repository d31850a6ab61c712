"""Training never hangs silently: large images with forked workers, and the stall watchdog."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _tall_gray_set(root: Path, n: int = 6) -> Path:
    """Large, tall 8-bit grayscale images: decoding and resizing them starts OpenCV's thread pool."""
    good = root / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = cv2.GaussianBlur((rng.random((1250, 500)) * 255).astype(np.uint8), (0, 0), 3)
        cv2.imwrite(str(good / f"{i:03d}.png"), img)
    return root


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--kind",
        "pouta",
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.num_workers=1",
        *extra,
    ]


def test_large_tall_grayscale_trains_with_a_worker(tmp_path: Path) -> None:
    data = _tall_gray_set(tmp_path / "data")
    cmd = [sys.executable, "-m", "pouta.trainer.train", *_train_cmd(data, tmp_path / "run")]
    # Before the fix the forked worker deadlocked in cv2.setNumThreads: no step, ever.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done after 3 steps" in proc.stdout
    assert (tmp_path / "run" / "model.pt").is_file()
    # 500x1250 is elongated: tiled by default, and tiles keep the discriminator's map alone
    from pouta.trainer.checkpoint import read_checkpoint

    model_config = read_checkpoint(tmp_path / "run" / "model.pt")["model_config"]
    assert model_config["reconstruction_cue"] is False and model_config["cue_scales"] is None
    assert "reconstruction cue: off for tiled input" in proc.stdout


@pytest.mark.parametrize(
    ("where", "patch"),
    [
        # A loader worker that never delivers a batch, as the fork deadlock did.
        ("worker", "training_set.TrainingSet.__getitem__ = lambda *a, **k: time.sleep(3600)"),
        # A hang in the training process itself, before the first step (set-up included).
        ("main", "synthesis.AnomalySynthesizer.__call__ = lambda *a, **k: time.sleep(3600)"),
    ],
)
def test_forced_stall_exits_with_the_watchdog_error(tmp_path: Path, where: str, patch: str) -> None:
    data = _tall_gray_set(tmp_path / "data", n=4)
    script = f"import sys, time\nfrom pouta.trainer.data import training_set\nfrom pouta.trainer.synthesis import anomalies as synthesis\n{patch}\nfrom pouta.trainer.train import main\nmain(sys.argv[1:])\n"
    args = _train_cmd(data, tmp_path / "run", "--set", "train.stall_timeout_s=4")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pouta-train: stalled: no optimizer step completed in")
    assert "after step 0" in last and "train.stall_timeout_s=4" in last
    # Where the run is stuck is shown: the sleeping frame, in the worker when it hangs there.
    assert "<lambda>" in proc.stderr
    assert ("stack of worker process" in proc.stderr) == (where == "worker")
    assert not (tmp_path / "run" / "model.pt").exists()
