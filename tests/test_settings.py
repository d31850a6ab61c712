"""One configuration layer: unknown keys and wrong types are one-line errors naming the key,
in every command, and ``--print-config`` shows what a run would use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.settings import Schema, merge, parse_sets, resolve

SCHEMA = Schema(
    {
        "model": {"path": None, "threads": 2, "spin": True, "providers": ["CPU"]},
        "source": {"trigger": "off", "fps": None, "nodes": {"Gain": 0}, "timeout_s": 1.0},
        "out": Path("results"),
        "tile_scale": "auto",
    },
    alternatives={"tile_scale": (str, float)},
    free_form=frozenset({"source.nodes"}),
)


def test_types_follow_the_defaults() -> None:
    cfg = merge(
        SCHEMA.defaults, {"model": {"threads": 4, "path": "m.onnx"}, "source": {"timeout_s": 2}}, SCHEMA
    )
    assert cfg["model"]["threads"] == 4 and cfg["source"]["timeout_s"] == 2  # a float default takes an int
    assert merge(SCHEMA.defaults, {"tile_scale": 0.5}, SCHEMA)["tile_scale"] == 0.5  # declared alternative
    assert merge(SCHEMA.defaults, {"out": "elsewhere"}, SCHEMA)["out"] == Path("elsewhere")
    # YAML reads an unquoted off as false: a word key takes it back as the word.
    assert merge(SCHEMA.defaults, {"source": {"trigger": False}}, SCHEMA)["source"]["trigger"] == "off"
    assert merge(SCHEMA.defaults, {"tile_scale": False}, SCHEMA)["tile_scale"] == "off"
    # Free-form mappings are replaced whole, not merged key by key.
    assert merge(SCHEMA.defaults, {"source": {"nodes": {"ExposureTime": 900}}}, SCHEMA)["source"][
        "nodes"
    ] == {"ExposureTime": 900}
    for bad, message in (
        ({"model": {"threads": "four"}}, r"^model\.threads: expected an integer, got 'four'$"),
        ({"model": {"threads": 2.5}}, r"^model\.threads: expected an integer"),
        ({"model": {"spin": "yes please"}}, r"^model\.spin: expected true/false"),
        ({"model": {"providers": "CPU"}}, r"^model\.providers: expected a list"),
        (
            {"model": {"treads": 1}},
            r"^model\.treads: unknown key \(known in model: path, providers, spin, threads\)$",
        ),
        ({"model": 3}, r"^model: expected a mapping, got 3$"),
        ({"tile_scale": [1]}, r"^tile_scale: expected a string or a number"),
    ):
        with pytest.raises(ConfigError, match=message):
            merge(SCHEMA.defaults, bad, SCHEMA)


def test_layers_and_set_syntax(tmp_path: Path) -> None:
    f = tmp_path / "line.yaml"
    f.write_text("model:\n  threads: 3\nsource:\n  fps: 10\n")
    cfg = resolve(SCHEMA, f, ["model.threads=5", "source.nodes={Gain: 3}"], {"source": {"fps": 20}})
    assert (
        cfg["model"]["threads"] == 5 and cfg["source"]["fps"] == 20 and cfg["source"]["nodes"] == {"Gain": 3}
    )
    assert parse_sets(["a.b=[1, 2]", "c="]) == {"a": {"b": [1, 2]}, "c": None}
    with pytest.raises(ConfigError, match="--set: expected KEY=VALUE"):
        parse_sets(["model.threads"])
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        resolve(SCHEMA, tmp_path / "nope.yaml")


def test_edge_run_set_and_print_config(capsys: pytest.CaptureFixture[str], brightness_onnx: Path) -> None:
    from pouta.edge.cli import main

    argv = ["run", "--model", str(brightness_onnx), "--set", "postprocess.min_area=25", "--print-config"]
    assert main([*argv, "--set", "pipeline.queue_size=8"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["postprocess"]["min_area"] == 25 and cfg["pipeline"]["queue_size"] == 8
    assert cfg["model"]["path"] == str(brightness_onnx) and cfg["output"]["dir"] == "results"
    assert main([*argv, "--set", "pipeline.queue_size=many"]) == 2
    assert "pipeline.queue_size: expected an integer, got 'many'" in capsys.readouterr().err
    assert main([*argv, "--set", "pipeline.queue=8"]) == 2
    assert "pipeline.queue: unknown key" in capsys.readouterr().err


def test_train_set_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    from pouta.trainer.train import main

    main(
        [
            "--data",
            "somewhere",
            "--kind",
            "vanilla",
            "--set",
            "train.lr=2e-4",
            "--set",
            "synthesis.modes={spot: 1}",
            "--print-config",
        ]
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == pytest.approx(2e-4) and cfg["model"]["kind"] == "vanilla"
    assert cfg["synthesis"]["modes"] == {"spot": 1} and cfg["data"]["tile_scale"] == "auto"
    assert cfg["train"]["stall_timeout_s"] == 300  # defaults are printed, from the packaged preset
    main(["--data", "somewhere", "--tile-scale", "off", "--print-config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["tile_scale"] == "off"  # YAML reads the flag's off as false: back to the word
    for bad, message in (
        ("train.lr=fast", "pouta-train: train.lr: expected a number, got 'fast'"),
        ("train.stall_timeout=5", "pouta-train: train.stall_timeout: unknown key"),
        ("data.tile_scale=[2]", "pouta-train: data.tile_scale: expected a string or a number"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--data", "somewhere", "--set", bad, "--print-config"])
        assert str(exc.value.code).startswith(message)


def test_build_engine_set_and_print_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from pouta.calibration.cli import build_engine_main

    cfg_file = tmp_path / "build.yaml"
    cfg_file.write_text("n_calib: 40\nholdout: held\n")
    argv = ["m.onnx", "--calib", str(tmp_path), "--int8", "--config", str(cfg_file), "--print-config"]
    assert build_engine_main([*argv, "--set", "max_batch=4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["n_calib"], cfg["holdout"], cfg["max_batch"], cfg["int8"], cfg["fp16"]) == (
        40,
        "held",
        4,
        True,
        False,
    )
    assert build_engine_main([*argv, "--set", "cpu_format=fast"]) == 2
    assert "cpu_format: expected one of qdq, qoperator, got 'fast'" in capsys.readouterr().err
    assert build_engine_main([*argv, "--set", "max_batch=x"]) == 2
    assert "max_batch: expected an integer, got 'x'" in capsys.readouterr().err


def test_bench_set_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    from pouta.benchmarks.cli import main

    assert main(["--set", "quality_minutes=2", "--set", "sections=[quality]", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["quality_minutes"] == 2 and cfg["sections"] == ["quality"]
    assert main(["--set", "sections=[speed]", "--print-config"]) == 2
    assert "sections: unknown ['speed']" in capsys.readouterr().err
    assert main(["--set", "iters=lots"]) == 2
    assert "iters: expected an integer, got 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "argv", "key", "value", "bad", "error"),
    [
        (
            "pouta.trainer.evaluate",
            ["--onnx", "m.onnx", "--data", "d"],
            "batch_size",
            2,
            "batch_size=x",
            "expected an integer",
        ),
        ("pouta.trainer.export", ["m.pt", "-o", "m.onnx"], "opset", 18, "opsett=18", "unknown key"),
        ("pouta.trainer.models.cost", [], "size", "64x64", "json=maybe", "expected true/false"),
        ("pouta.trainer.demo", [], "train_minutes", 1.5, "steps=many", "expected an integer"),
        ("pouta.trainer.data.demo_data", [], "n_train", 12, "n_trian=12", "unknown key"),
    ],
)
def test_small_commands_set_and_print_config(
    capsys: pytest.CaptureFixture[str],
    module: str,
    argv: list[str],
    key: str,
    value: object,
    bad: str,
    error: str,
) -> None:
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as done:
        main([*argv, "--set", f"{key}={value}", "--print-config"])
    assert done.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)[key] == value
    with pytest.raises(SystemExit) as failed:
        main([*argv, "--set", bad])
    err = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("pouta-") and error in err and bad.split("=")[0] in err
