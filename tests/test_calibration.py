"""Calibration sets, the two CLIs end to end on CPU, the accuracy guard, torch-free import."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_models import dark_part, make_brightness_model
from pouta.calibration import cli
from pouta.calibration.calibset import ImageSetReader, load_image_set
from pouta.calibration.errors import CalibrationError
from pouta.edge.contract.metadata import load_for_model, metadata_path
from pouta.edge.contract.preprocess import Preprocessor

H = W = 64
PRE = Preprocessor(H, W)


def _parts(folder: Path, n: int, defect: bool = False, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"p{i:03d}.png"), dark_part(H, W, rng, defect))
    return folder


def test_set_is_deterministic_recursive_and_hashed(tmp_path: Path) -> None:
    _parts(tmp_path / "a", 6, seed=1)
    _parts(tmp_path / "a" / "sub", 6, seed=2)
    s1 = load_image_set(tmp_path / "a", PRE, n=8, seed=3, min_images=2)
    s2 = load_image_set(tmp_path / "a", PRE, n=8, seed=3, min_images=2)
    assert s1.files == s2.files and s1.sha256 == s2.sha256 and len(s1) == 8 and s1.n_found == 12
    assert any("sub" in p.parts for p in s1.files)
    assert load_image_set(tmp_path / "a", PRE, n=8, seed=4, min_images=2).sha256 != s1.sha256
    work, geometry = next(s1.frames())
    batch = geometry.cut(work)
    assert batch.shape == (1, 3, H, W) and batch.dtype == np.float32
    r = ImageSetReader(s1, synthetic_fraction=0.5, seed=0)
    first = [r.get_next()["image"] for _ in range(len(s1))]  # type: ignore[index]
    assert r.get_next() is None
    r.rewind()
    assert all(np.array_equal(a, r.get_next()["image"]) for a in first)  # type: ignore[index]


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _parts(tmp_path, 5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    skipped: list[str] = []
    s = load_image_set(tmp_path, PRE, n=None, min_images=2, on_skip=lambda p, why: skipped.append(p.name))
    assert len(s) == 5 and sorted(skipped) == ["broken.png", "empty.jpg"] and s.describe()["skipped"] == 2


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "calibration folder not found"),
        ("empty", "no image files"),
        ("few", r"3 usable calibration images found \(4 files, 1 unreadable\), need at least 16"),
    ],
)
def test_clear_errors(tmp_path: Path, setup: str, match: str) -> None:
    folder = tmp_path / "calib"
    if setup != "missing":
        folder.mkdir()
    if setup == "few":
        _parts(folder, 3)
        (folder / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CalibrationError, match=match) as exc:
        load_image_set(folder, PRE, n=100, min_images=16)
    assert "\n" not in str(exc.value) and str(folder) in str(exc.value)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {
        "dir": d,
        "calib": _parts(d / "calib", 30, seed=0),
        "defects": _parts(d / "defects", 8, defect=True, seed=1),
    }


def test_build_engine_without_tensorrt_writes_portable_artifacts(
    data: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "tensorrt_version", lambda: None)
    model = make_brightness_model(data["dir"] / "model.onnx", H, W)
    rc = cli.build_engine_main(
        [
            str(model),
            "--int8",
            "--fp16",
            "--calib",
            str(data["calib"]),
            "--defects",
            str(data["defects"]),
            "--n-calib",
            "20",
            "--min-calib",
            "8",
            "--calib-method",
            "percentile",
            "--max-auroc-drop",
            "0.01",
            "--max-flip-rate",
            "0.25",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    trt_lines = [line for line in out.splitlines() if "TensorRT is not installed" in line]
    assert len(trt_lines) == 1 and "model.int8.onnx" in trt_lines[0]
    for name, precision in [
        ("model.fp16.onnx", "fp16"),
        ("model.int8.onnx", "int8"),
        ("model.int8.trt.onnx", "int8"),
    ]:
        meta = load_for_model(data["dir"] / name)
        assert meta.precision == precision and meta.parent_artifact == "model.onnx"
        assert meta.thresholds is not None and meta.thresholds.scored_with == name
        assert meta.thresholds.n_normal == 20 and meta.thresholds.n_defect == 8
        assert len(meta.artifact_sha256) == 64 and meta.build
        assert (data["dir"] / f"{name}.scores.png").is_file()
    cal = load_for_model(data["dir"] / "model.int8.trt.onnx").calibration
    assert cal["method"] == "percentile" and cal["size"] == 20 and len(cal["set_sha256"]) == 64
    guard = json.loads((data["dir"] / "model.guard.json").read_text())
    assert guard["passed"] and guard["n_normal"] == 10 and guard["n_defect"] == 8
    assert guard["max_flip_rate"] == 0.25 and guard["warnings"] == []
    assert len(guard["artifacts"]) == 3 and "AUROC" in out


def test_guard_flip_tolerance_catches_what_auroc_cannot() -> None:
    from pouta.calibration.artifacts.guard import WARN_FLIP_RATE, compare

    labels = np.repeat([False, True], 10)
    ref = np.concatenate([np.linspace(0.1, 0.4, 10), np.linspace(0.6, 0.9, 10)])
    # Same ranking as FP32 (no AUROC drop), but lifted so that four good parts now fail.
    lifted = ref + 0.22
    nudged = ref.copy()
    nudged[9] = 0.55  # one normal crosses: 1 of 20, under the warning level
    candidates = [("model.int8.trt.onnx", "int8", lifted, 0.5), ("model.int8.onnx", "int8", nudged, 0.5)]

    report = compare(labels, ref, 0.5, candidates)
    assert report.passed and all(a.auroc_drop == 0.0 for a in report.artifacts)
    assert [a.n_flipped for a in report.artifacts] == [4, 1] and 1 / 20 <= WARN_FLIP_RATE < 4 / 20
    assert len(report.warnings) == 1 and "model.int8.trt.onnx changes 4 of 20" in report.warnings[0]
    assert "WARNING: model.int8.trt.onnx" in report.table()

    failed = compare(labels, ref, 0.5, candidates, max_auroc_drop=0.01, max_flip_rate=0.1)
    assert not failed.passed and failed.warnings == []
    assert failed.reason == (
        "model.int8.trt.onnx changes 4 of 20 held-out verdicts vs FP32 (20.0%), more than --max-flip-rate 0.1"
    )
    assert compare(labels, ref, 0.5, candidates, max_flip_rate=0.2).passed
    with pytest.raises(CalibrationError, match="--max-flip-rate: expected a share between 0 and 1, got 20"):
        compare(labels, ref, 0.5, candidates, max_flip_rate=20)


def test_bad_flip_tolerance_fails_before_any_work(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", H, W)
    args = [str(model), "--calib", str(data["calib"]), "--min-calib", "8", "--max-flip-rate", "5"]
    assert cli.build_engine_main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == "pouta-build-engine: --max-flip-rate: expected a share between 0 and 1, got 5.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]


def test_guard_failure_exits_with_one_line_reason(
    data: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "tensorrt_version", lambda: None)
    model = make_brightness_model(
        data["dir"] / "g" / "model.onnx" if (data["dir"] / "g").mkdir() is None else "", H, W
    )
    # The brightness model's image scores tie at 1.0 for every defect, so any AUROC "gain"
    # is impossible; a negative allowance forces the failure path deterministically.
    rc = cli.build_engine_main(
        [
            str(model),
            "--int8",
            "--calib",
            str(data["calib"]),
            "--defects",
            str(data["defects"]),
            "--n-calib",
            "20",
            "--min-calib",
            "8",
            "--max-auroc-drop",
            "-0.5",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_GUARD and err.count("\n") == 0 and "more than --max-auroc-drop" in err


def test_calibrate_writes_thresholds_into_sidecar(
    data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (data["dir"] / "c").mkdir()
    model = make_brightness_model(data["dir"] / "c" / "model.onnx", H, W)
    rc = cli.calibrate_main(
        [
            str(model),
            "--calib",
            str(data["calib"]),
            "--min-calib",
            "8",
            "--rule",
            "normal-quantile",
            "--quantile",
            "0.95",
            "--iqr-k",
            "1.5",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    t = load_for_model(model).thresholds
    assert t is not None and t.rule == "normal-quantile" and t.params["iqr_k"] == 1.5 and t.n_normal == 30
    assert t.scored_with == "model.onnx" and 0.0 <= t.pixel <= 1.0
    assert (data["dir"] / "c" / "model.onnx.scores.png").is_file()


@pytest.mark.parametrize("case", ["no-sidecar", "f1-all-normal", "few"])
def test_cli_one_line_errors(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", H, W, with_metadata=case != "no-sidecar")
    args = [str(model), "--calib", str(data["calib"]), "--min-calib", "8"]
    if case == "f1-all-normal":
        args += ["--rule", "f1-optimal"]
    if case == "few":
        args = [str(model), "--calib", str(_parts(tmp_path / "few", 2))]
    assert cli.calibrate_main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("pouta-calibrate: ") and "\n" not in err
    expected = {
        "no-sidecar": "metadata file not found",
        "f1-all-normal": "needs defect images",
        "few": "need at least",
    }
    assert expected[case] in err
    if case == "no-sidecar":
        assert not metadata_path(model).exists()


def test_calibration_imports_without_torch() -> None:
    import pouta.calibration as pkg

    # Every module of every subpackage (thresholds, artifacts, engines) too.
    modules = [m.name for m in pkgutil.walk_packages(pkg.__path__, "pouta.calibration.")]
    assert {"pouta.calibration.thresholds.rules", "pouta.calibration.engines.tensorrt"} <= set(modules)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "import pouta.trainer.metrics\n"
        "assert not any(k == 'torch' or k.startswith('torch.') for k in sys.modules)\n"
        "print('ok', len(sys.argv))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert len(modules) >= 10


def test_holdout_labelled_split_and_unused_normals(tmp_path: Path) -> None:
    from pouta.calibration.thresholds.holdout import holdout_sets

    calib = _parts(tmp_path / "calib", 12)
    test = tmp_path / "test"
    _parts(test / "good", 4, seed=5)
    _parts(test / "broken", 3, defect=True, seed=6)
    _parts(test / "scratch", 2, defect=True, seed=7)
    model = make_brightness_model(tmp_path / "m.onnx", H, W)
    normal = load_image_set(calib, PRE, n=8, min_images=2)
    h_norm, h_def, split = holdout_sets(load_for_model(model), normal, None, test)
    assert h_norm is not None and h_def is not None and "labelled" in split
    assert len(h_norm) == 4 and len(h_def) == 5 and not set(h_norm.files) & set(h_def.files)
    rest, _, split = holdout_sets(load_for_model(model), normal, None, None)
    assert rest is not None and len(rest) == 4 and not set(rest.files) & set(normal.files)
