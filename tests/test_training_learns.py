"""Training learns: every model kind, trained for a short fixed budget on data the project
generates, exported, calibrated and run through ``pouta-edge run``, ranks and rejects the
defects; the same pipeline with the weights frozen at initialisation does not.

The discriminator's map alone is scored (``model.reconstruction_cue=false``): on this demo
texture an untrained autoencoder's reconstruction error already ranks the drawn defects,
so the cue would hide a discriminator that learned nothing. The floor is set where the
trained models clear it and the frozen control (near-chance ranking, no defect rejected)
falls far below it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pouta.trainer.models import MODEL_KINDS  # noqa: E402

STEPS = 150
SIZE = 64
N_GOOD, N_DEFECT_PER_TYPE = 12, 6  # 12 good, 18 defective test parts
FLOOR_AUROC = 0.9  # the ranking: what training must learn
MAX_FALSE_REJECTS = 1  # of the 12 good parts, at the calibrated threshold
# Share of the 18 defective parts rejected at the calibrated threshold (normal-max-margin on
# held-out good parts). An untrained model rejects none. prn ranks the parts well after a
# short training but its scores sit close together, so the margin passes most defects:
# its floor only asks for some.
FLOOR_CAUGHT = {"pouta": 0.5, "vanilla": 0.5, "features": 0.4, "prn": 0.05}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pouta.trainer.data.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("learns")
    category = make_demo_dataset(
        root / "data", n_train=40, n_test_good=N_GOOD, n_test_defect=N_DEFECT_PER_TYPE, size=SIZE, seed=0
    )
    # Good parts of another seed calibrate the threshold, as pouta-demo does.
    hold = make_demo_dataset(root / "hold", n_train=24, n_test_good=1, n_test_defect=0, size=SIZE, seed=1)
    return {"category": category, "calib": hold / "train" / "good", "root": root}


def _train(category: Path, out: Path, kind: str, steps: int) -> Path:
    from pouta.trainer.train import parser, train
    from pouta.trainer.train_config import build_config

    argv = ["--data", str(category), "--kind", kind, "--steps", str(steps), "--size", f"{SIZE}x{SIZE}"]
    argv += ["--out", str(out), "--seed", "0", "--set", "model.reconstruction_cue=false"]
    argv += ["--set", "train.num_workers=0"]
    cfg = build_config(parser().parse_args(argv))
    threads = torch.get_num_threads()
    try:
        return train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


def _line_run(parts: dict[str, Path], kind: str, steps: int, tag: str) -> dict[str, Any]:
    """Train -> pouta-export -> pouta-calibrate -> pouta-edge run; what the line would see."""
    from pouta.calibration.cli import calibrate_main
    from pouta.edge.cli import main as edge_main
    from pouta.trainer.export import main as export_main
    from pouta.trainer.metrics import roc_auc

    out = parts["root"] / f"{kind}-{tag}"
    checkpoint = _train(parts["category"], out / "run", kind, steps)
    model = out / "model.onnx"
    export_main([str(checkpoint), "-o", str(model)])
    assert calibrate_main([str(model), "--calib", str(parts["calib"])]) == 0
    code = edge_main(
        [
            "run",
            "--images",
            str(parts["category"] / "test"),
            "--model",
            str(model),
            "--out",
            str(out / "res"),
            "--quiet",
        ]
    )
    assert code == 0
    with (out / "res" / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_GOOD + 3 * N_DEFECT_PER_TYPE and {r["label"] for r in rows} == {"OK", "NG"}
    defect = [r["label"] == "NG" for r in rows]
    scores = [float(r["score"]) for r in rows]
    false_rejects = sum(r["verdict"] != "OK" for r, d in zip(rows, defect, strict=True) if not d)
    caught = sum(r["verdict"] == "NG" for r, d in zip(rows, defect, strict=True) if d)
    return {
        "kind": kind,
        "auroc": roc_auc([float(d) for d in defect], scores),
        "false_rejects": false_rejects,
        "caught": caught / sum(defect),
    }


def _meets_floor(r: dict[str, Any]) -> bool:
    return (
        r["auroc"] >= FLOOR_AUROC
        and r["false_rejects"] <= MAX_FALSE_REJECTS
        and r["caught"] >= FLOOR_CAUGHT.get(r["kind"], 0.5)
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_short_training_finds_the_defects(parts: dict[str, Path], kind: str) -> None:
    result = _line_run(parts, kind, STEPS, "trained")
    assert _meets_floor(result), result


@pytest.mark.slow
def test_the_floor_fails_a_model_that_did_not_learn(
    parts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same pipeline with every optimizer step a no-op (weights stay at
    their initialisation) must fall below the floor, or the floor proves nothing."""
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)
    result = _line_run(parts, MODEL_KINDS[0], 10, "frozen")
    assert not _meets_floor(result), result
    assert result["caught"] == 0.0 and result["auroc"] < 0.75, result
