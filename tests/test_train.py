"""Training: config handling, deterministic data order, LR schedule, checkpoints, resume after kill -9."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pouta.edge.contract.errors import ConfigError
from pouta.trainer.checkpoint import load_model, read_checkpoint, save_checkpoint
from pouta.trainer.data.training_set import epoch_batches
from pouta.trainer.models import build_model, preset_config
from pouta.trainer.train import StepPace, _fit_to_budget, lr_at, parser, train
from pouta.trainer.train_config import build_config, model_config_from

torch.set_num_threads(2)


def _args(**kw: object) -> argparse.Namespace:
    """The trainer's own parser on the command line these keyword arguments spell (POUTA
    unless a kind is given: these tests are about the from-scratch trainer)."""
    kw.setdefault("kind", "pouta")
    argv: list[str] = []
    for key, value in kw.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{key.replace('_', '-')}", str(item)]
    return parser().parse_args(argv)


def test_default_kind_is_the_presets() -> None:
    assert build_config(parser().parse_args([]))["model"]["kind"] == "prn"
    assert build_config(parser().parse_args([]))["model"]["height"] == 256
    assert build_config(parser().parse_args(["--preset", "paper"]))["model"]["kind"] == "pouta"
    assert build_config(parser().parse_args(["--kind", "prn"]))["train"]["weight_decay"] == 1e-2


def test_config_overrides_and_errors() -> None:
    cfg = build_config(
        _args(
            preset="tiny",
            size="64x96",
            steps=7,
            set=["train.lr=0.001", "synthesis.anomaly_prob=0.7", "model.fusion_width=8"],
        )
    )
    assert cfg["model"]["height"] == 64 and cfg["model"]["width"] == 96
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["synthesis"]["anomaly_prob"] == pytest.approx(0.7) and cfg["model"]["fusion_width"] == 8
    with pytest.raises(ConfigError, match="--size"):
        build_config(_args(size="big"))
    with pytest.raises(ConfigError, match="60x64"):
        build_config(_args(size="60x64"))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config(_args(set=["train.lr"]))
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        build_config(_args(config="nope.yaml"))
    assert build_config(_args(preset="paper"))["model"]["height"] == 224
    # a typo or a key from another tool must not be silently ignored
    with pytest.raises(
        ConfigError, match=r"^input: unknown key \(known: data, model, out, synthesis, train\)"
    ):
        build_config(_args(set=["input.height=96"]))
    with pytest.raises(ConfigError, match=r"^train\.lr_gama: unknown key"):
        build_config(_args(set=["train.lr_gama=0.5"]))
    with pytest.raises(ConfigError, match=r"^model\.heigth: unknown key"):
        build_config(_args(set=["model.heigth=96"]))
    with pytest.raises(ConfigError, match=r"^synthesis\.anomaly_probability: unknown key"):
        build_config(_args(set=["synthesis.anomaly_probability=0.5"]))
    with pytest.raises(ConfigError, match=r"^model: expected a mapping"):
        build_config(_args(set=["model=3"]))
    with pytest.raises(ConfigError, match=r"^model\.reconstruction_cue: expected auto, true or false"):
        build_config(_args(set=["model.reconstruction_cue=maybe"]))
    with pytest.raises(ConfigError, match=r"^model\.disc_widths: expected auto or positive integers"):
        build_config(_args(set=["model.disc_widths=wide"]))
    with pytest.raises(
        ConfigError, match=r"^model\.fusion_width: expected auto or a positive integer, got 'wide'"
    ):
        build_config(_args(set=["model.fusion_width=wide"]))
    with pytest.raises(ConfigError, match=r"^train\.threads: expected an integer, got 'two'"):
        build_config(_args(set=["train.threads=two"]))  # null by default, still checked
    for bad in ("-1", "0"):
        with pytest.raises(ConfigError, match=r"^train\.threads: expected a positive integer or null"):
            build_config(_args(set=[f"train.threads={bad}"]))


@pytest.mark.parametrize(
    ("hw", "cue_set", "expected", "said"),
    [
        ((96, 96), None, True, None),  # whole image, auto: on
        ((100, 300), None, False, "off for tiled input"),  # elongated: tiled, auto: off
        ((100, 300), "true", True, "on for tiled input, as set"),  # an explicit true is kept
        ((96, 96), "false", False, None),
    ],
)
def test_reconstruction_cue_follows_the_geometry_unless_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hw: tuple[int, int],
    cue_set: str | None,
    expected: bool,
    said: str | None,
) -> None:
    from pouta.trainer.data.training_set import resolve_geometry

    sets = [] if cue_set is None else [f"model.reconstruction_cue={cue_set}"]
    cfg = build_config(_args(size="32x32", set=sets))
    resolve_geometry(cfg, _flat_images(tmp_path, hw))
    assert cfg["model"]["reconstruction_cue"] is expected
    out = capsys.readouterr().out
    assert (said is None and "reconstruction cue" not in out) or (said is not None and said in out)


@pytest.mark.parametrize(
    ("hw", "sets", "widths", "fusion"),
    [
        ((96, 96), [], [16, 16, 32, 32], 16),  # whole image, auto: the tiny preset's
        ((100, 300), [], [32, 32, 64, 64], 32),  # tiled, auto: twice them
        ((100, 300), ["model.disc_widths=[8,8,16,16]", "model.fusion_width=8"], [8, 8, 16, 16], 8),
    ],
)
def test_discriminator_widths_follow_the_geometry_unless_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hw: tuple[int, int],
    sets: list[str],
    widths: list[int],
    fusion: int,
) -> None:
    from pouta.trainer.data.training_set import resolve_geometry

    cfg = build_config(_args(size="32x32", set=sets))
    resolve_geometry(cfg, _flat_images(tmp_path, hw))
    mcfg = model_config_from(cfg)
    assert list(mcfg.disc_widths) == widths and mcfg.fusion_width == fusion
    said = "discriminator: disc_widths [32, 32, 64, 64], fusion_width 32 for tiled input"
    assert (said in capsys.readouterr().out) == (widths == [32, 32, 64, 64])


@pytest.mark.parametrize(
    ("hw", "sets", "sigma_hw"),
    [
        ((96, 96), [], None),  # whole, squashed alike both ways: the score's round blur
        ((100, 300), [], None),  # tiled: tiles keep the part's proportions
        ((64, 512), [], [4.0, 0.5]),  # whole (too many tiles): 2x down, 16x across
        ((100, 300), ["data.tile_scale=off"], [4.0, 1.3333]),  # forced whole: 3.1x down, 9.4x across
        ((64, 512), ["model.map_sigma_hw=[2,2]"], [2.0, 2.0]),  # set explicitly: kept
        ((64, 512), ["model.map_sigma_hw=null"], None),
    ],
)
def test_map_blur_is_round_on_the_part_unless_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    hw: tuple[int, int],
    sets: list[str],
    sigma_hw: list[float] | None,
) -> None:
    from pouta.trainer.data.training_set import resolve_geometry

    cfg = build_config(_args(size="32x32", set=sets))
    if not sets:
        assert cfg["model"]["map_sigma_hw"] == "auto"
    resolve_geometry(cfg, _flat_images(tmp_path, hw))
    mcfg = model_config_from(cfg)
    assert mcfg.map_sigma_hw == (None if sigma_hw is None else tuple(sigma_hw))
    assert mcfg.map_sigma == 4.0  # the image score's blur stays round in input pixels
    said = "anomaly map: blurred round on the part, sigma 4 rows, 0.5 columns"
    assert (said in capsys.readouterr().out) == (sigma_hw == [4.0, 0.5])


def test_map_blur_rejects_a_bad_word_or_non_numbers() -> None:
    with pytest.raises(ConfigError, match=r"^model.map_sigma_hw: expected auto, null or two numbers"):
        model_config_from(build_config(_args(set=["model.map_sigma_hw=wide"])))
    with pytest.raises(ConfigError, match=r"^model.map_sigma_hw: expected null or two numbers in \[0, 32\]"):
        model_config_from(build_config(_args(set=["model.map_sigma_hw=[a,b]"])))


def _flat_images(folder: Path, hw: tuple[int, int]) -> list[Path]:
    paths = []
    for i in range(3):
        paths.append(folder / f"{i}.png")
        cv2.imwrite(str(paths[-1]), np.full(hw, 60 + 40 * i, np.uint8))
    return paths


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    a = epoch_batches(10, 3, seed=1, epoch=2)
    assert a == epoch_batches(10, 3, seed=1, epoch=2)
    assert len(a) == 3 and all(len(b) == 3 for b in a) and len({i for b in a for i in b}) == 9
    assert a != epoch_batches(10, 3, seed=1, epoch=3) or a != epoch_batches(10, 3, seed=2, epoch=2)
    assert epoch_batches(2, 8, 0, 0)[0] in ([0, 1], [1, 0])  # fewer images than the batch size


def test_lr_schedule_steps_at_80_and_90_percent() -> None:
    lrs = [lr_at(s, 100, 2e-4, [0.8, 0.9], 0.2) for s in (0, 79, 80, 89, 90, 99)]
    assert lrs == pytest.approx([2e-4, 2e-4, 4e-5, 4e-5, 8e-6, 8e-6])


def test_checkpoint_is_weights_only_and_round_trips(tmp_path: Path) -> None:
    cfg = preset_config("tiny", "pouta", "hsg", height=32, width=32)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters())
    path = save_checkpoint(tmp_path / "ck.pt", model, cfg, optimizer=opt, step=9, info={"note": "x"})
    raw = torch.load(path, weights_only=True)  # no pickled objects
    assert isinstance(raw["model_config"], str) and raw["step"] == 9
    loaded, cfg2, info = load_model(path)
    assert cfg2 == cfg and info["step"] == 9 and info["note"] == "x" and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not list(tmp_path.glob(".*tmp"))  # temp file renamed away
    with pytest.raises(ConfigError, match="missing.pt: checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt"):
        read_checkpoint(tmp_path / "bad.pt")


def _make_images(folder: Path, n: int = 6, size: int = 40) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(60, 120, size=(size // 4, size // 4, 3), dtype=np.uint8)
        img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def _config(data: Path, out: Path, steps: int) -> dict:
    cfg = build_config(_args(preset="tiny", data=str(data), size="32x32", steps=steps, out=str(out), seed=3))
    cfg["train"].update(batch_size=2, checkpoint_every=7, log_every=1, num_workers=0, threads=1, lr=1e-3)
    return cfg


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = _make_images(tmp_path / "good")
    steps = 40  # 3 steps per epoch, checkpoints every 7: the kill lands mid-epoch
    threads = torch.get_num_threads()
    try:
        ref = train(_config(data, tmp_path / "ref", steps), progress=False)
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_config(data, run, steps)))
    exe = [sys.executable, "-m", "pouta.trainer.train"]
    proc = subprocess.Popen(
        [*exe, "--config", str(cfg_path), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "trainer exited"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(run / "last.pt")["step"]
    assert 0 < killed_at < steps and not (run / "model.pt").exists(), "the kill must land mid-run"

    res = subprocess.run(
        [*exe, "--resume", str(run), "--no-progress"], capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr[-2000:]
    a, cfg_a, info_a = load_model(ref)
    b, cfg_b, info_b = load_model(run / "model.pt")
    assert info_a["step"] == info_b["step"] == steps
    # the reconstruction cue's scales are fitted at the end of either run, identically
    assert cfg_a.cue_scales is not None and min(cfg_a.cue_scales) > 0
    assert cfg_b.cue_scales == pytest.approx(cfg_a.cue_scales, rel=1e-5)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6, msg=f"{k} differs after resume")

    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # redone steps are not logged twice
    assert (run / "loss_curve.png").stat().st_size > 0


def test_time_budget_follows_the_recent_pace_not_an_early_slow_spell() -> None:
    pace = StepPace(start_step=0)
    elapsed = 0.0
    marked = []
    for step in range(1, 401):
        elapsed += 2.0 if step <= 100 else 0.5  # a slow start, then the machine's real pace
        if pace.mark(step, elapsed):
            marked.append(step)
    assert marked == list(range(10, 401, 10))  # the moments the budget is re-planned
    assert pace.seconds_per_step() == pytest.approx(0.5)
    # 350 s spent of 600: 250 s left at 0.5 s/step (0.97 margin); the whole-run average
    # (0.875 s/step) would have planned 277 more steps instead of 485.
    assert elapsed == 350.0
    assert _fit_to_budget(400, 5000, 900, elapsed, 600.0, pace.seconds_per_step()) == 400 + 485
    # capped at the configured steps; fixed once 70% of the schedule is done; none before a pace
    assert _fit_to_budget(400, 800, 900, elapsed, 600.0, 0.5) == 800
    assert _fit_to_budget(400, 5000, 560, elapsed, 600.0, 0.5) == 560
    assert _fit_to_budget(10, 5000, 3000, 5.0, 600.0, None) == 3000
    fresh = StepPace(start_step=100)  # after a resume: the warm-up steps are not counted
    assert [s for s in range(101, 111) if fresh.mark(s, float(s))] == [110]
    assert fresh.seconds_per_step() is None
    assert [s for s in range(111, 121) if fresh.mark(s, float(s))] == [120]
    assert fresh.seconds_per_step() == pytest.approx(1.0)
