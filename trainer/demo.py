"""``pouta-demo``: the whole line-side workflow on a CPU machine, end to end.

make demo data (good parts + a labelled test set) -> train a ``tiny`` model of the default kind -> export ONNX
-> calibrate the pass/fail threshold on held-out good parts -> build the portable
INT8/FP16 artifacts -> ``pouta-edge run`` over the test folder replayed as a camera.

Each step runs the real console script, so the demo shows the commands an inspection
engineer types; they are printed before they run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pouta.edge.contract.settings import add_config_args, settings_or_exit

# The demo's operating point, in the line's currency: at most 5% of good parts rejected,
# with 95% confidence. The order-statistic bound needs 59 good parts for that (the largest
# of them is then the threshold); the demo makes 80 so that a few unreadable ones would not
# stop it. A real line asks for less (0.5% needs 598 good parts).
DEMO_TARGET_FALSE_REJECT = 0.05
DEMO_CONFIDENCE = 0.95
DEMO_CALIB_GOOD = 80


def _script(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _run(cmd: list[str]) -> None:
    shown = " ".join(shlex.quote(Path(c).name if i == 0 else c) for i, c in enumerate(cmd))
    print(f"\n$ {shown}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        sys.exit(f"pouta-demo: step failed with exit code {proc.returncode}: {shown}")
    print(f"  ({time.monotonic() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pouta-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo", help="working folder (default: ./demo)")
    ap.add_argument("--train-minutes", type=float, default=3.0, help="training time budget")
    ap.add_argument(
        "--steps", type=int, default=1500, help="training steps (stops earlier at the time budget)"
    )
    ap.add_argument(
        "--data", default=None, help="use this MVTec-layout category instead of generated demo data"
    )
    add_config_args(ap, config_file=True)
    args = ap.parse_args(argv)
    settings_or_exit(ap, args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        category = Path(args.data)
        calib = category / "train" / "good"
        holdout = None  # the training images calibrate: a stated bound on them would be optimistic
    else:
        # A second, differently seeded set of good parts calibrates the threshold: scores
        # of the training images themselves would be optimistically low.
        _run([_script("pouta-demo-data"), "--out", str(out / "data"), "--seed", "0"])
        _run(
            [
                _script("pouta-demo-data"), "--out", str(out / "holdout"), "--seed", "1",
                "--n-train", str(DEMO_CALIB_GOOD), "--n-test-good", "10", "--n-test-defect", "3",
            ]
        )  # fmt: skip
        category = out / "data" / "surface"
        calib = out / "holdout" / "surface" / "train" / "good"
        holdout = out / "holdout" / "surface" / "test"
    run_dir = out / "train"
    _run(
        [
            _script("pouta-train"),
            "--data", str(category),
            "--preset", "tiny",
            "--steps", str(args.steps),
            "--time-limit-min", str(args.train_minutes),
            "--out", str(run_dir),
        ]
    )  # fmt: skip
    model = out / "model.onnx"
    _run([_script("pouta-export"), str(run_dir / "model.pt"), "-o", str(model)])
    build = [_script("pouta-build-engine"), str(model), "--int8", "--fp16", "--calib", str(calib)]
    if holdout is not None:
        build += ["--holdout", str(holdout), "--target-false-reject", str(DEMO_TARGET_FALSE_REJECT)]
        build += ["--confidence", str(DEMO_CONFIDENCE)]
    _run(build)
    _run(
        [
            _script("pouta-edge"), "run",
            "--images", str(category / "test"),
            "--engine", str(out / "model.int8.onnx"),
            "--out", str(out / "results"),
        ]
    )  # fmt: skip
    print(f"\nDone. Verdicts, overlays and result files: {out / 'results'}")


if __name__ == "__main__":
    main()
