"""``pouta-bench``: options, the order the sections run in, and where results go.

The report starts with the command that reproduces it; that command spells out every
option (defaults resolved), so a later change of a default does not change what the
printed command measures.

Longer than ~350 lines on purpose: the one place where every section's options are
declared and the sections are sequenced; the sections live in their own modules.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pouta.edge.contract import settings
from pouta.edge.contract.errors import ConfigError

from . import report, report_charts, synthetic
from .common import (
    DEFAULT_DATA,
    Result,
    log,
    machine_info,
    package_versions,
    run_isolated,
    skipped,
    to_jsonable,
    usable_cores,
)
from .sections import accuracy, cost, cue_weights, endtoend, latency, quality
from .timing import TimingPlan

# "quality" trains models per real category (hours on a CPU) and "cue-weights" rescores its
# PRNs: only when asked for.
DEFAULT_SECTIONS = ("cost", "latency", "accuracy", "e2e")
SECTIONS = (*DEFAULT_SECTIONS, "quality", "cue-weights")
BACKEND_NAMES = (
    "torch-cpu-fp32",
    "torch-cuda-fp32",
    "torch-cuda-fp16",
    "ort-cpu-fp32",
    "ort-cpu-int8",
    "ort-cuda-fp32",
    "trt-fp16",
    "trt-int8",
)


@dataclass
class Options:
    out: Path = Path("runs/bench")
    quick: bool = False
    preset: str = "paper"
    height: int = 224
    width: int = 224
    batches: list[int] = field(default_factory=lambda: [1, 8])
    threads: int = 0  # 0: every usable core
    warmup: int = 5
    iters: int = 50
    min_iters: int = 10
    budget_s: float = 90.0
    backends: list[str] = field(default_factory=lambda: list(BACKEND_NAMES))
    sections: list[str] = field(default_factory=lambda: list(DEFAULT_SECTIONS))
    data: Path | None = None
    checkpoints: Path | None = None
    calib: Path | None = None
    frames: Path | None = None
    train_preset: str = "tiny"
    train_size: str | None = None  # HxW; None: the preset's own size
    train_minutes: float = 8.0
    train_steps: int = 100000
    acc_iters: int = 30
    e2e_frames: int = 60
    quality_minutes: float = 10.0
    quality_kinds: list[str] = field(default_factory=lambda: ["pouta", "vanilla"])
    seed: int = 0

    def command(self) -> str:
        """The full command line that reproduces this run, every option explicit."""
        args = ["pouta-bench", "--out", str(self.out)]
        if self.quick:
            args.append("--quick")
        args += ["--preset", self.preset, "--size", f"{self.height}x{self.width}"]
        args += ["--batches", ",".join(map(str, self.batches)), "--threads", str(self.threads)]
        args += ["--warmup", str(self.warmup), "--iters", str(self.iters), "--min-iters", str(self.min_iters)]
        args += ["--budget-s", f"{self.budget_s:g}", "--backends", ",".join(self.backends)]
        args += ["--sections", ",".join(self.sections)]
        for flag, value in (
            ("--data", self.data),
            ("--checkpoints", self.checkpoints),
            ("--calib", self.calib),
            ("--frames", self.frames),
        ):
            if value is not None:
                args += [flag, str(value)]
        args += ["--train-preset", self.train_preset, "--train-minutes", f"{self.train_minutes:g}"]
        if self.train_size:
            args += ["--train-size", self.train_size]
        args += ["--train-steps", str(self.train_steps), "--acc-iters", str(self.acc_iters)]
        args += ["--e2e-frames", str(self.e2e_frames), "--seed", str(self.seed)]
        if "quality" in self.sections:
            args += [
                "--quality-minutes",
                f"{self.quality_minutes:g}",
                "--quality-kinds",
                ",".join(self.quality_kinds),
            ]
        return shlex.join(args)


QUICK = {
    "preset": "tiny",
    "height": 64,
    "width": 64,
    "batches": [1, 2],
    "warmup": 1,
    "iters": 5,
    "min_iters": 3,
    "budget_s": 3.0,
    # One thread: with two, PyTorch's OpenMP workers spin against any other load on a
    # 2-core CI box and a 20 ms call turns into a second; the smoke run must stay short.
    "threads": 1,
    "train_minutes": 0.5,
    # No training in quick mode: an untrained checkpoint exercises load, export, quantize, score.
    "train_steps": 0,
    "train_size": "64x64",
    "acc_iters": 3,
    "e2e_frames": 8,
}


def _csv_ints(text: str) -> list[int]:
    vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _csv_of(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        vals = [v for v in text.replace(" ", "").split(",") if v]
        bad = [v for v in vals if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}, expected some of {', '.join(choices)}")
        return vals

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pouta-bench",
        description="POUTA vs vanilla: params/FLOPs (paper Table 5), latency per backend, accuracy beside "
        "cost, edge runtime end to end. Writes report.md, results.json and PNG charts into --out.",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/bench, quick: runs/bench-quick)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny preset, small sizes, few iterations (CI smoke run)"
    )
    ap.add_argument("--preset", default=None, help="model preset for cost and latency (default paper)")
    ap.add_argument(
        "--size", type=settings.hw_arg, default=None, help="input HxW for cost/latency (default 224x224)"
    )
    ap.add_argument("--batches", type=_csv_ints, default=None, help="batch sizes timed (default 1,8)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (0: all cores)"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds per model, capped at a fifth of --budget-s (default 5)",
    )
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per model at most (default 50)")
    ap.add_argument("--min-iters", type=int, default=None, help="timed iterations at least (default 10)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds per backend and batch before stopping at --min-iters",
    )
    ap.add_argument(
        "--backends", type=_csv_of(BACKEND_NAMES), default=None, help="subset of backends (default all)"
    )
    ap.add_argument(
        "--sections",
        type=_csv_of(SECTIONS),
        default=None,
        help=f"sections to run (default {','.join(DEFAULT_SECTIONS)}; 'quality' trains --quality-kinds "
        "on every category under --data; 'cue-weights' rescores its PRNs per head weight)",
    )
    ap.add_argument("--data", type=Path, default=None, help=f"MVTec-layout category (default {DEFAULT_DATA})")
    ap.add_argument(
        "--checkpoints", type=Path, default=None, help="reuse DIR/pouta/ and DIR/vanilla/ checkpoints"
    )
    ap.add_argument(
        "--calib",
        type=Path,
        default=None,
        help="normal images for INT8 calibration (default data/train/good)",
    )
    ap.add_argument(
        "--frames", type=Path, default=None, help="folder replayed end to end (default data/test)"
    )
    ap.add_argument(
        "--train-preset", default=None, help="preset of the models trained for accuracy (default tiny)"
    )
    ap.add_argument(
        "--train-size", default=None, help="HxW the accuracy models train and run at (default: preset's)"
    )
    ap.add_argument("--train-minutes", type=float, default=None, help="training budget per model (default 8)")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="training steps at most per model (0: no training, untrained weights)",
    )
    ap.add_argument(
        "--acc-iters", type=int, default=None, help="latency iterations for the accuracy table's artifacts"
    )
    ap.add_argument("--e2e-frames", type=int, default=None, help="frames replayed end to end at most")
    ap.add_argument(
        "--quality-minutes", type=float, default=None, help="quality: training budget per model (default 10)"
    )
    ap.add_argument(
        "--quality-kinds",
        type=_csv_of(quality.KINDS),
        default=None,
        help="quality: models trained per category (default pouta,vanilla; a finished row is reused)",
    )
    ap.add_argument("--seed", type=int, default=None)
    settings.add_config_args(ap, config_file=True)
    return ap


def resolve(ns: argparse.Namespace) -> Options:
    """Defaults, then ``--quick`` overrides, then what the user passed."""
    values: dict[str, Any] = asdict(Options())
    if ns.quick:
        values.update(QUICK, quick=True, out=Path("runs/bench-quick"))
    # Then a settings file and --set items (checked against the options and their types).
    values = settings.resolve(settings.Schema(values), ns.config, ns.set)
    for key in ("data", "checkpoints", "calib", "frames"):
        if isinstance(values[key], str):
            values[key] = Path(values[key])
    unknown_sections = set(values["sections"]) - set(SECTIONS)
    if unknown_sections:
        raise ConfigError(
            f"sections: unknown {sorted(unknown_sections)}, expected some of {', '.join(SECTIONS)}"
        )
    own = ("quick", "size", *settings.OWN_ARGS)
    given = {k: v for k, v in vars(ns).items() if v is not None and k not in own}
    values.update(given)
    if ns.size is not None:
        values["height"], values["width"] = ns.size
    opts = Options(**values)
    if opts.threads <= 0:
        opts.threads = usable_cores()
    if opts.data is None and not opts.quick and DEFAULT_DATA.is_dir():
        opts.data = DEFAULT_DATA
    return opts


def _calib_dir(opts: Options) -> Path:
    if opts.calib is not None:
        return opts.calib
    if opts.data is not None and (opts.data / "train" / "good").is_dir():
        return opts.data / "train" / "good"
    # Latency does not depend on pixel values, but the INT8 quantizer needs some images.
    return synthetic.make_image_folder(opts.out / "synthetic-calib", n=16, size=max(opts.height, opts.width))


def _frames_dir(opts: Options, calib: Path) -> Path:
    if opts.frames is not None:
        return opts.frames
    if opts.data is not None and (opts.data / "test").is_dir():
        return opts.data / "test"
    return calib


def run(opts: Options) -> Result:
    """Every selected section, each isolated; returns (and writes) the results."""
    t0 = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        # Every section (cost counting and scoring too) uses the stated thread count.
        torch.set_num_threads(opts.threads)
    except ImportError:
        pass
    results: Result = {
        "command": opts.command(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "options": to_jsonable(asdict(opts)),
        "machine": machine_info(opts.threads),
        "versions": package_versions(),
    }
    if opts.quick and opts.data is None:
        # Quick runs must not depend on a dataset: a generated category exercises the same code.
        opts.data = synthetic.make_category(opts.out / "synthetic-data", size=max(opts.height, opts.width))
        log(f"quick mode: generated test data in {opts.data}")
    calib = _calib_dir(opts)
    plan = TimingPlan(opts.warmup, opts.iters, opts.min_iters, opts.budget_s)
    ctx = latency.LatencyContext(
        opts.preset, opts.height, opts.width, opts.threads, opts.out / "artifacts", calib
    )
    sections: dict[str, Result] = {}

    def want(name: str) -> bool:
        return name in opts.sections

    sections["cost"] = (
        run_isolated("cost", lambda: cost.run_cost(opts.preset, opts.height, opts.width))
        if want("cost")
        else skipped("not selected (--sections)")
    )
    sections["latency"] = (
        run_isolated("latency", lambda: latency.run_latency(ctx, opts.batches, plan, opts.backends))
        if want("latency")
        else skipped("not selected (--sections)")
    )
    acc_plan = TimingPlan(
        min(2, opts.warmup), opts.acc_iters, min(opts.min_iters, opts.acc_iters), opts.budget_s
    )
    sections["accuracy"] = (
        run_isolated(
            "accuracy",
            lambda: accuracy.run_accuracy(
                opts.data,
                opts.out / "accuracy",
                opts.train_preset,
                opts.train_minutes,
                opts.train_steps,
                opts.checkpoints,
                opts.calib,
                opts.threads,
                acc_plan,
                opts.seed,
                opts.train_size,
            ),
        )
        if want("accuracy")
        else skipped("not selected (--sections)")
    )

    def e2e() -> Result:
        frames = _frames_dir(opts, calib)
        paths = {f"{kind}-fp32": ctx.onnx(kind, "fp32", 1) for kind in ("pouta", "vanilla")}
        try:
            paths["pouta-int8"] = ctx.onnx("pouta", "int8", 1)
        except Exception as exc:
            log(f"end-to-end: no INT8 POUTA ({exc})")
        res = endtoend.run_endtoend(paths, frames, opts.threads, opts.e2e_frames, opts.out / "e2e")
        res["height"], res["width"] = opts.height, opts.width
        return res

    sections["e2e"] = run_isolated("e2e", e2e) if want("e2e") else skipped("not selected (--sections)")
    sections["quality"] = (
        run_isolated(
            "quality",
            lambda: quality.run_quality(
                opts.data, opts.out / "quality", opts.quality_minutes, tuple(opts.quality_kinds)
            ),
        )
        if want("quality") and opts.data is not None
        else skipped("not selected (--sections quality --data ROOT)")
    )
    sections["cue-weights"] = (
        run_isolated(
            "cue-weights",
            lambda: cue_weights.run_cue_weights(opts.data, opts.out / "quality", opts.out / "cue-weights"),
        )
        if want("cue-weights") and opts.data is not None
        else skipped("not selected (--sections cue-weights --data ROOT)")
    )
    results["sections"] = sections
    results["targets"] = [
        t for name in ("cost", "latency") for t in sections[name].get("targets", []) if isinstance(t, dict)
    ]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results = to_jsonable(results)
    (opts.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    try:
        results["charts"] = report_charts.write_charts(results, opts.out)
    except Exception as exc:  # charts are a convenience: the numbers are in the JSON and report
        log(f"charts failed: {exc}")
        results["charts"] = {}
    (opts.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (opts.out / "report.md").write_text(report.markdown(results), encoding="utf-8")
    log(f"wrote {opts.out / 'report.md'}, {opts.out / 'results.json'} ({results['total_seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        opts = resolve(ns)
    except ConfigError as exc:
        print(f"pouta-bench: {exc}", file=sys.stderr)
        return 2
    if ns.print_config:
        print(settings.dump(asdict(opts)), end="")
        return 0
    log(f"command: {opts.command()}")
    results = run(opts)
    print(report.summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
