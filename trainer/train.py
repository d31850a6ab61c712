"""``pouta-train``: train an anomaly detector of any kind (default prn) on good images only.

    pouta-train --data ../shared/data/mvtec_ad/bottle --preset tiny --time-limit-min 10 --out runs/bottle

Config: a YAML file (``--config``, default the packaged ``tiny.yaml``/``paper.yaml`` of
``--preset``) with CLI overrides. Resumable: ``--resume runs/bottle`` continues from
``last.pt`` and reaches the same weights an uninterrupted run would, because the data
order and the anomaly synthesis of every sample are pure functions of
(seed, epoch, index) and the checkpoint carries the model, optimizer, LR schedule,
step and RNG states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pouta.edge.contract.errors import ConfigError, PoutaError
from pouta.edge.contract.fsutil import atomic_write_json
from pouta.edge.contract.settings import dump, parse_sets

from .checkpoint import read_checkpoint, save_checkpoint
from .data.training_set import (
    batch_stream,
    build_training_set,
    resolve_geometry,
    single_threaded_opencv,
    training_paths,
)
from .evaluate import progress_bar
from .geometry import preprocessor_for_training
from .losses import total_loss
from .models import EQUAL_CUE_WEIGHTS, KINDS, MODEL_KINDS, ModelConfig, build_model, fit_cue_scales
from .train_config import build_config, model_config_from, resume_config
from .train_log import plot_losses, truncate_log
from .watchdog import StallWatchdog

LAST = "last.pt"
FINAL = "model.pt"
LOG = "train_log.jsonl"
CUE_FIT_INPUTS = 64  # normal inputs that fix the cue scales (seconds on a CPU)
CUE_FIT_BATCH = 8
# Normal inputs a pretrained-backbone kind fills its memories from, and those held out
# (other images) that fix its normalisers.
MEMORY_FIT_INPUTS = 256
MEMORY_HELD_OUT_INPUTS = 64
# The time budget is re-planned from the pace of the most recent steps: a slow spell early
# in a run (another process, a checkpoint write) must not shorten the whole schedule.
PACE_WINDOW_STEPS = 200
PACE_WARMUP_STEPS = 10  # the first steps create kernels and start the data worker


class TrainingError(PoutaError):
    """Training cannot go on (non-finite data or loss)."""


# -- training -----------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def lr_at(step: int, steps: int, base: float, milestones: list[float], gamma: float) -> float:
    passed = sum(1 for m in milestones if step >= math.floor(m * steps))
    return base * gamma**passed


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    cfg: dict[str, Any] | None = None,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = True,
    resume_overrides: dict[str, Any] | None = None,
) -> Path:
    """Run (or continue) training; returns the final checkpoint path (``<out>/model.pt``).

    With ``resume`` (a checkpoint or its folder) the checkpoint's stored config is used;
    ``resume_overrides`` may change only the ``train`` keys in ``RESUMABLE_OVERRIDES``.
    """
    ck = None
    if resume is not None:
        rp = Path(resume)
        rp = rp / LAST if rp.is_dir() else rp
        ck = read_checkpoint(rp)
        cfg = resume_config(ck["train_config"], resume_overrides or {})
        cfg["out"] = str(rp.parent)
    if cfg is None:
        raise ConfigError("train: either a config or a checkpoint to resume is needed")
    # From here on, no step within the limit (data loading and the first batch included)
    # ends the run with the stacks of every process, instead of a silent hang.
    with StallWatchdog(float(cfg["train"]["stall_timeout_s"])) as watchdog:
        return _train(cfg, ck, progress, watchdog)


def _train(cfg: dict[str, Any], ck: dict[str, Any] | None, progress: bool, watchdog: StallWatchdog) -> Path:
    tc = cfg["train"]
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    if tc["threads"]:
        torch.set_num_threads(int(tc["threads"]))
    single_threaded_opencv()  # before the training images are decoded and workers forked
    paths = training_paths(cfg)
    if ck is None:
        resolve_geometry(cfg, paths)
    mcfg = model_config_from(cfg)
    cfg["model"] = {**mcfg.to_dict()}
    device = resolve_device(str(tc["device"]))
    seed = int(tc["seed"])
    torch.manual_seed(seed)
    model = build_model(mcfg, pretrained=ck is None)
    dataset, data_info = build_training_set(cfg, mcfg, paths)
    tick = lambda: watchdog.beat(0)  # noqa: E731 - fitting a memory is progress, not a stall
    if not KINDS[mcfg.kind].trains:
        return _fit_only(model, cfg, dataset, data_info, out, device, tick, watchdog)
    if ck is None and hasattr(model, "fit_before_training"):
        mcfg = _fit_before_training(model, dataset, seed, tick)
        cfg["model"] = mcfg.to_dict()
    model = model.to(device)
    # channels_last: oneDNN's convolutions (forward and backward) are ~20-30% faster on CPU.
    memory_format = torch.channels_last if tc["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(tc["lr"]),
        weight_decay=float(tc["weight_decay"]),
    )
    use_amp = bool(tc["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if ck is None:
        grids = dataset.save_grids(out)
        print(f"pouta-train: synthetic defects: {', '.join(p.name for p in grids)} in {out}", flush=True)
    steps = int(tc["steps"])
    step = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if "scaler" in ck and use_amp:
            scaler.load_state_dict(ck["scaler"])
        step = int(ck["step"])
        steps = int(ck["scheduler"]["steps"])
        _set_rng_state(ck.get("rng") or {})
        truncate_log(out / LOG, step)
    milestones = [float(m) for m in tc["lr_milestones"]]
    gamma = float(tc["lr_gamma"])
    ck_every = max(1, int(tc["checkpoint_every"]))
    log_every = max(1, int(tc["log_every"]))
    limit_s = float(tc["time_limit_min"]) * 60 if tc["time_limit_min"] else None
    bs = int(tc["batch_size"])

    def save(path: Path, status: str, seconds: float) -> Path:
        info = {**data_info, "status": status, "steps_planned": steps, "seconds_this_run": round(seconds, 1)}
        return save_checkpoint(
            path,
            model,
            mcfg,
            optimizer=opt,
            scheduler={"steps": steps, "milestones": milestones, "gamma": gamma},
            scaler=scaler if use_amp else None,
            step=step,
            rng=_rng_state(),
            train_config=cfg,
            info=info,
        )

    pbar = progress_bar(progress, steps, "train", "step", initial=step)
    t0 = time.monotonic()
    start_step = step
    pace = StepPace(start_step)
    status = "done"
    model.train()
    # More loader processes than cores only adds context switches (the paper preset asks
    # for 4, sized for a GPU host); batches do not depend on the worker count.
    workers = min(int(tc["num_workers"]), os.cpu_count() or 1)
    stream = batch_stream(dataset, bs, seed, step, workers)
    with (out / LOG).open("a", encoding="utf-8") as log:
        while step < steps:
            batch = next(stream)
            lr = lr_at(step, steps, float(tc["lr"]), milestones, gamma)
            for g in opt.param_groups:
                g["lr"] = lr
            image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            original = batch["original"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            if not (torch.isfinite(image).all() and torch.isfinite(original).all()):
                raise TrainingError(
                    f"step {step}: the training batch contains NaN/inf (check pouta.trainer.synthesis.anomalies)"
                )
            if hasattr(model, "training_loss"):  # a kind that computes its own loss (prn, redi)
                with torch.autocast(device.type, enabled=use_amp):
                    parts = model.training_loss(image, original, mask)  # type: ignore[operator]
            else:
                with torch.autocast(device.type, enabled=use_amp):
                    o = model(image)
                assert o.logits is not None and o.reconstruction is not None
                parts = total_loss(o.reconstruction, original, o.logits, mask, o.side_logits)
            if not torch.isfinite(parts.total):
                raise TrainingError(
                    f"step {step}: loss is {float(parts.total)} ({parts.as_floats()}); lower train.lr"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(parts.total).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            watchdog.beat(step)
            elapsed = time.monotonic() - t0
            if step % log_every == 0 or step == steps:
                row = {"step": step, "lr": lr, **parts.as_floats(), "elapsed_s": round(elapsed, 2)}
                log.write(json.dumps(row) + "\n")
                log.flush()
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix({k: f"{v:.3f}" for k, v in parts.as_floats().items()}, refresh=False)
            if limit_s is not None:
                if pace.mark(step, elapsed):
                    steps = _fit_to_budget(
                        step, int(tc["steps"]), steps, elapsed, limit_s, pace.seconds_per_step()
                    )
                if pbar is not None and pbar.total != steps:
                    pbar.total = steps
                    pbar.refresh()
                if elapsed >= limit_s and step < steps:
                    status = "time_limit"
                    break
            if step % ck_every == 0 and step < steps:
                save(out / LAST, "running", elapsed)
    if pbar is not None:
        pbar.close()
    seconds = time.monotonic() - t0
    save(out / LAST, status, seconds)
    if hasattr(model, "fit_after_training"):
        mcfg = _fit_after_training(model, dataset, device, memory_format)
        cfg["model"] = mcfg.to_dict()
    elif mcfg.reconstruction_cue:
        mcfg = _fit_cues(model, dataset, device, memory_format)
        cfg["model"] = mcfg.to_dict()
    final = save_final(out / FINAL, model, mcfg, cfg, {**data_info, "status": status, "steps": step}, seconds)
    plot_losses(out / LOG, out / "loss_curve.png")
    summary = {
        "status": status,
        "steps": step,
        "seconds_this_run": round(seconds, 1),
        "checkpoint": str(final),
    }
    watchdog.close()
    if tc["eval_at_end"]:
        summary["eval"] = _evaluate(model, mcfg, cfg, out, device)
    atomic_write_json(out / "train_summary.json", summary)
    print(f"pouta-train: {status} after {step} steps ({seconds:.0f} s this run) -> {final}", flush=True)
    return final


def save_final(
    path: Path, model: torch.nn.Module, mcfg: ModelConfig, cfg: dict, info: dict, seconds: float
) -> Path:
    """The deliverable checkpoint: weights + configs, no optimizer state."""
    return save_checkpoint(
        path,
        model,
        mcfg,
        step=int(info.get("steps", 0)),
        train_config=cfg,
        info={**info, "seconds_last_run": round(seconds, 1)},
    )


def _fit_cues(
    model: torch.nn.Module, dataset: Any, device: torch.device, memory_format: torch.memory_format
) -> ModelConfig:
    """Measure both cues on normal training inputs; the model's config then carries them."""
    x = torch.from_numpy(dataset.normal_inputs(CUE_FIT_INPUTS))
    k_disc, k_rec = fit_cue_scales(model, _batches(x, device, memory_format))
    mcfg: ModelConfig = model.cfg  # type: ignore[assignment]
    w_disc, w_rec = mcfg.cue_weights or EQUAL_CUE_WEIGHTS
    print(
        f"pouta-train: cues fitted on {len(x)} normal inputs: discriminator scale {k_disc:.4g} "
        f"weight {w_disc:.2f}, reconstruction error ({mcfg.cue_error}) scale {k_rec:.4g} "
        f"weight {w_rec:.2f}",
        flush=True,
    )
    return mcfg


def _batches(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format | None = None) -> list:
    return [
        x[i : i + CUE_FIT_BATCH].to(device).contiguous(memory_format=memory_format or torch.contiguous_format)
        for i in range(0, len(x), CUE_FIT_BATCH)
    ]


def _memory_inputs(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    fit, held = dataset.normal_split(MEMORY_FIT_INPUTS, MEMORY_HELD_OUT_INPUTS)
    return torch.from_numpy(fit), torch.from_numpy(held)


def _fit_only(
    model: torch.nn.Module,
    cfg: dict,
    dataset: Any,
    data_info: dict,
    out: Path,
    device: torch.device,
    tick: Callable[[], None],
    watchdog: StallWatchdog,
) -> Path:
    """A kind without gradient training: fill its memory from good parts, fit its normaliser
    on good parts the memory has not seen, save, evaluate when asked."""
    t0 = time.monotonic()
    seed = int(cfg["train"]["seed"])
    fit, held = _memory_inputs(dataset)
    print(
        f"pouta-train: {cfg['model']['kind']}: memory from {len(fit)} normal inputs, normaliser from "
        f"{len(held)} held-out ones",
        flush=True,
    )
    model = model.to(device, memory_format=torch.channels_last)  # faster CPU convolutions
    nhwc = torch.channels_last
    seen = model.fit(_batches(fit, device, nhwc), _batches(held, device, nhwc), seed, tick)  # type: ignore[operator]
    mcfg: ModelConfig = model.cfg  # type: ignore[assignment]
    cfg["model"] = mcfg.to_dict()
    seconds = time.monotonic() - t0
    print(
        f"pouta-train: memory of {mcfg.memory_size} patch features chosen from {seen}; distance scale "
        f"{mcfg.distance_scale:.4g} ({seconds:.0f} s)",
        flush=True,
    )
    info = {**data_info, "status": "done", "steps": 0}
    final = save_final(out / FINAL, model, mcfg, cfg, info, seconds)
    summary: dict[str, Any] = {
        "status": "done",
        "steps": 0,
        "seconds_this_run": round(seconds, 1),
        "checkpoint": str(final),
    }
    watchdog.close()
    if cfg["train"]["eval_at_end"]:
        summary["eval"] = _evaluate(model, mcfg, cfg, out, device)
    atomic_write_json(out / "train_summary.json", summary)
    print(f"pouta-train: done ({seconds:.0f} s) -> {final}", flush=True)
    return final


def _fit_before_training(
    model: torch.nn.Module, dataset: Any, seed: int, tick: Callable[[], None]
) -> ModelConfig:
    """A kind's fit from good parts before training (prn: prototypes and memory; redi: its
    gallery of prompts); the held-out images stay out of it for ``_fit_after_training``."""
    fit, _ = _memory_inputs(dataset)
    t0 = time.monotonic()
    fitted = model.fit_before_training(_batches(fit, torch.device("cpu")), seed, tick)  # type: ignore[operator]
    print(
        f"pouta-train: {model.cfg.kind}: {fitted} from {len(fit)} normal inputs "  # type: ignore[union-attr]
        f"({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    return model.cfg  # type: ignore[return-value]


def _fit_after_training(
    model: torch.nn.Module, dataset: Any, device: torch.device, memory_format: torch.memory_format
) -> ModelConfig:
    """A kind's normaliser from held-out good parts after training (prn: the cues' scales;
    redi: the map's k)."""
    _, held = _memory_inputs(dataset)
    fitted = model.fit_after_training(_batches(held, device, memory_format))  # type: ignore[operator]
    print(f"pouta-train: fitted on {len(held)} held-out normal inputs: {fitted}", flush=True)
    return model.cfg  # type: ignore[return-value]


class StepPace:
    """Seconds per optimizer step over about the last ``PACE_WINDOW_STEPS`` steps.

    A mark is kept every 10 steps once ``PACE_WARMUP_STEPS`` steps of this run are done
    (``mark`` says whether it kept one: the moments to re-plan the budget);
    ``seconds_per_step`` is None until two marks exist.
    """

    def __init__(self, start_step: int) -> None:
        self.start_step = int(start_step)
        self.marks: deque[tuple[int, float]] = deque()

    def mark(self, step: int, elapsed: float) -> bool:
        done = step - self.start_step
        if done < PACE_WARMUP_STEPS or done % 10:
            return False
        self.marks.append((step, elapsed))
        while len(self.marks) > 2 and self.marks[1][0] <= step - PACE_WINDOW_STEPS:
            self.marks.popleft()
        return True

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (s0, e0), (s1, e1) = self.marks[0], self.marks[-1]
        return (e1 - e0) / (s1 - s0)


def _fit_to_budget(
    step: int, planned: int, steps: int, elapsed: float, limit_s: float, per_step: float | None
) -> int:
    """The schedule length that fits the time budget, at most ``planned`` (the configured steps).

    Called at each ``StepPace`` mark with the recent seconds per step; re-plans while the
    run is in the first 70% of its schedule (before any LR decay), so the decays happen in
    time even when the machine is slower (or faster) than expected; fixed after that.
    """
    if per_step is None or step >= 0.7 * steps:
        return steps
    affordable = step + int(max(0.0, limit_s - elapsed) * 0.97 / per_step)
    return max(step + 1, min(planned, affordable))


def _evaluate(model: torch.nn.Module, mcfg: ModelConfig, cfg: dict, out: Path, device: torch.device) -> dict:
    from .data.readers import open_dataset
    from .evaluate import evaluate, torch_scorer

    d = cfg["data"]
    test = open_dataset(d["root"], split="test", layout=d["layout"], category=d["category"])
    model.eval()
    res = evaluate(
        torch_scorer(model, device),
        test,
        preprocessor_for_training(cfg, mcfg.height, mcfg.width),
        out_dir=out / "eval",
    )
    keys = ("image_auroc", "pixel_auroc", "pixel_ap")
    print("pouta-train: eval " + ", ".join(f"{k} {res[k]:.4f}" for k in keys if res.get(k) is not None))
    return {k: res.get(k) for k in keys}


# -- CLI ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pouta-train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML config file, or a packaged one: tiny | paper")
    ap.add_argument("--data", help="category folder of training data (data.root)")
    ap.add_argument("--category", help="category inside a multi-category root (data.category)")
    ap.add_argument(
        "--defects",
        help="a few real defective parts with masks (MVTec layout), trained on with the synthetic "
        "anomalies (data.defects); kinds that learn from anomalies (prn, pouta, vanilla) use them",
    )
    ap.add_argument("--preset", choices=["tiny", "paper"], help="width preset (and default config)")
    ap.add_argument("--variant", choices=["full", "base", "hsg", "mss"], help="POUTA ablation variant")
    ap.add_argument(
        "--kind",
        choices=MODEL_KINDS,
        help="model kind: " + "; ".join(f"{k}: {spec.summary}" for k, spec in KINDS.items()),
    )
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument(
        "--size",
        help="model input (tile) size HxW, multiples of 16 (e.g. 128x128); 'auto' = one whole-image "
        "input with the data's aspect ratio (no tiling)",
    )
    ap.add_argument(
        "--tile-scale",
        help="auto (default: whole image, tiles for elongated images shrunk over 2x) | off (whole "
        "image) | a work scale for tiles, e.g. 0.5",
    )
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", help="checkpoint (or output folder with last.pt) to continue from")
    ap.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--time-limit-min", type=float, help="stop within this many minutes of training")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. train.lr=1e-3")
    ap.add_argument(
        "--print-config", action="store_true", help="print the merged configuration (YAML) and exit"
    )
    ap.add_argument("--eval", action="store_true", help="evaluate on the test split at the end")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        if args.resume:
            overrides: dict[str, Any] = {}
            if args.device:
                overrides["device"] = args.device
            if args.time_limit_min is not None:
                overrides["time_limit_min"] = args.time_limit_min
            if args.eval:
                overrides["eval_at_end"] = True
            sets = parse_sets(args.set)
            unknown = sorted(set(sets) - {"train"})
            if unknown:
                raise ConfigError(f"--set {unknown[0]}: only train.* settings can change on resume")
            overrides.update(sets.get("train", {}))
            train(resume=args.resume, progress=not args.no_progress, resume_overrides=overrides)
            return
        cfg = build_config(args)
        if args.print_config:
            print(dump(cfg), end="")
            return
        train(cfg, progress=not args.no_progress)
    except PoutaError as exc:
        sys.exit(f"pouta-train: {exc}")
    except ImportError as exc:
        sys.exit(f"pouta-train: missing module ({exc}); install with pip install -e '.[train]'")


if __name__ == "__main__":
    main()
