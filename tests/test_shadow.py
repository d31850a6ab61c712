"""Shadow mode on a replayed folder: live verdicts unchanged by the shadow, the disagreement
folder holds exactly the parts the two models judge differently, and a promotion through
``pouta-edge promote`` changes the model id at one sequence number with no part lost."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from contract_models import make_brightness_model
from pouta.edge import cli
from pouta.edge.contract.fsutil import sha256_file
from pouta.edge.contract.metadata import load_for_model, metadata_path

SIZE = 64


def _parts(root: Path) -> Path:
    """Dark parts, bright spots (both models see them) and faint spots (only the sensitive one)."""
    rng = np.random.default_rng(5)
    yy, xx = np.ogrid[:SIZE, :SIZE]
    for kind, level, n in (("good", None, 6), ("spot", 240, 4), ("faint", 105, 5)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(20, 50, size=(SIZE, SIZE, 3), dtype=np.uint8)
            if level is not None:
                cy, cx = rng.integers(20, 44, size=2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = level
            cv2.imwrite(str(root / kind / f"{i:03d}.png"), img)
    return root


def _model(path: Path, level: float) -> Path:
    """A brightness model whose id carries its file hash, so two of them tell apart in records."""
    make_brightness_model(path, SIZE, SIZE, level=level)
    meta = load_for_model(path)
    meta.artifact_sha256 = sha256_file(path)
    meta.save(metadata_path(path))
    return path


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shadow")
    return {
        "images": _parts(d / "test"),
        "live": _model(d / "live.onnx", 0.5),
        "candidate": _model(d / "candidate.onnx", 0.3),
        "dir": d,
    }


def _run(line: dict[str, Path], out: Path, model: str, *extra: str) -> dict[str, str]:
    args = ["run", "--model", str(line[model]), "--images", str(line["images"]), "--out", str(out)]
    assert cli.main([*args, "--quiet", "--no-fsync", *extra]) == cli.EXIT_OK
    return {r["path"]: r["verdict"] for r in csv.DictReader((out / "results.csv").open())}


def test_shadow_leaves_live_verdicts_alone_and_keeps_exactly_the_disagreements(
    line: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live_alone = _run(line, tmp_path / "a", "live")
    cand_alone = _run(line, tmp_path / "b", "candidate")
    disagree = {p for p in live_alone if live_alone[p] != cand_alone[p]}
    # The test is only as good as its data: some parts agree, some do not.
    assert 0 < len(disagree) < len(live_alone) and all("faint" in p for p in disagree)
    capsys.readouterr()

    out = tmp_path / "s"
    with_shadow = _run(line, out, "live", "--shadow", str(line["candidate"]))
    assert with_shadow == live_alone
    summary = capsys.readouterr().out
    assert f"disagree {len(disagree)} " in summary and f"compared {len(live_alone)}" in summary

    kept = sorted((out / "shadow" / "disagreements").glob("*.json"))
    assert {json.loads(p.read_text())["live"]["path"] for p in kept} == disagree
    assert len(list((out / "shadow" / "disagreements").glob("*.png"))) == len(disagree)
    for p in kept:
        rec = json.loads(p.read_text())
        assert rec["live"]["verdict"] == live_alone[rec["live"]["path"]]
        assert rec["shadow"]["verdict"] == cand_alone[rec["live"]["path"]]
        frame = cv2.imread(str(p.with_suffix(".png")))
        assert np.array_equal(frame, cv2.imread(rec["live"]["path"]))  # the frame the models saw
    rows = list(csv.DictReader((out / "shadow" / "shadow.csv").open()))
    assert len(rows) == len(live_alone)
    assert {r["path"] for r in rows if r["agree"] == "0"} == disagree
    s = json.loads((out / "shadow" / "summary.json").read_text())
    assert s["compared"] == len(live_alone) and s["disagree"] == len(disagree) and s["skipped"] == 0
    assert sum(s["score_over_threshold_hist"].values()) == len(live_alone)
    # The live records do not mention the shadow; no model change happened.
    assert all("model_change" not in json.loads(p.read_text()) for p in (out / "parts").rglob("*.json"))


def test_promote_swaps_the_model_at_one_sequence_number_and_loses_no_part(
    line: dict[str, Path], tmp_path: Path
) -> None:
    live_alone = _run(line, tmp_path / "a", "live")
    cand_alone = _run(line, tmp_path / "b", "candidate")
    out = tmp_path / "p"
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "pouta.edge.cli", "run", "--model", str(line["live"])]
    cmd += ["--images", str(line["images"]), "--loop", "--fps", "40", "--out", str(out), "--no-fsync"]
    cmd += ["--shadow", str(line["candidate"]), "--summary-json", str(summary), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def model_ids() -> list[str]:
            csv_path = out / "results.csv"
            if not csv_path.exists():
                return []
            text = csv_path.read_text()
            lines = text.splitlines()[1:] if text.endswith("\n") else text.splitlines()[1:-1]  # whole lines
            return [line.rsplit(",", 1)[-1] for line in lines]

        def wait_for(done: Callable[[list[str]], bool], what: str) -> None:
            # Generous: the CI box is shared, and two models start before the first part.
            deadline = time.monotonic() + 120
            while not done(model_ids()):
                assert proc.poll() is None and time.monotonic() < deadline, f"no {what}"
                time.sleep(0.05)

        wait_for(lambda ids: len(ids) >= 20, "20 parts before the promotion")
        assert cli.main(["promote", "--pid", str(proc.pid)]) == cli.EXIT_OK
        # Stop only once the swap is in the records and the new model judged 10 more parts.
        wait_for(lambda ids: len(set(ids)) == 2 and ids.count(ids[-1]) >= 10, "model change")
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_OK, stderr
    assert "promoting test-brightness-fp32-" in stderr

    rows = list(csv.DictReader((out / "results.csv").open()))
    seqs = [int(r["seq"]) for r in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # every part, once, in order
    assert json.loads(summary.read_text())["processed"] == len(rows)
    ids = [r["model_id"] for r in rows]
    change = next(i for i in range(1, len(ids)) if ids[i] != ids[i - 1])
    assert len(set(ids[:change])) == 1 and len(set(ids[change:])) == 1 and ids[0] != ids[-1]
    # Before the change the live model's verdicts, after it the candidate's.
    assert all(r["verdict"] == live_alone[r["path"]] for r in rows[:change])
    assert all(r["verdict"] == cand_alone[r["path"]] for r in rows[change:])
    records = {
        json.loads(p.read_text())["seq"]: json.loads(p.read_text()) for p in (out / "parts").rglob("*.json")
    }
    changed = [s for s, r in records.items() if "model_change" in r]
    assert changed == [seqs[change]]
    assert records[seqs[change]]["model_change"] == {"from": ids[0], "to": ids[-1]}
    # The old live model is now the shadow: rows after the change compare against it.
    shadow_rows = list(csv.DictReader((out / "shadow" / "shadow.csv").open()))
    after = [r for r in shadow_rows if int(r["seq"]) >= seqs[change]]
    assert after and all(r["live_model_id"] == ids[-1] and r["shadow_model_id"] == ids[0] for r in after)


def test_promote_needs_a_running_process_and_a_shadow(
    line: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["promote", "--pid", "999999999"]) == cli.EXIT_CONFIG
    assert "promote --pid 999999999: no such process" in capsys.readouterr().err

    from pouta.edge.sinks.shadow import promote

    ok, message = promote(SimpleNamespace(sinks=[], model_id="m"))
    assert not ok and "has no shadow model" in message


def test_shadow_counts_reach_prometheus(line: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.liveview.metrics import PipelineCollector
    from prometheus_client import CollectorRegistry, generate_latest

    live_alone = _run(line, tmp_path / "a", "live")
    cand_alone = _run(line, tmp_path / "b", "candidate")
    n_disagree = sum(live_alone[p] != cand_alone[p] for p in live_alone)
    cfg = load_config(
        None,
        {
            "model": {"path": str(line["live"])},
            "shadow": {"path": str(line["candidate"])},
            "source": {"kind": "images", "path": str(line["images"])},
            "output": {"dir": str(tmp_path / "m"), "fsync": False},
        },
    )
    with build_pipeline(cfg) as pipe:
        pipe.start()
        assert pipe.join(60)
        registry = CollectorRegistry()
        registry.register(PipelineCollector(pipe.summary))
        text = generate_latest(registry).decode()
    assert f'pouta_shadow_parts_total{{outcome="agree"}} {float(len(live_alone) - n_disagree)}' in text
    live_ok_shadow_ng = sum(live_alone[p] == "OK" and cand_alone[p] == "NG" for p in live_alone)
    assert f'pouta_shadow_parts_total{{outcome="live_ok_shadow_ng"}} {float(live_ok_shadow_ng)}' in text
    assert 'pouta_shadow_model_info{model_id="test-brightness-fp32-' in text


def test_live_view_shows_operating_point_report_and_shadow(line: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    import urllib.request

    from pouta.calibration import cli as calib_cli
    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.contract.metadata import operating_point_line
    from pouta.edge.liveview.server import attach_http

    model = _model(tmp_path / "model.onnx", 0.5)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(9)
    for i in range(30):
        cv2.imwrite(str(calib / f"{i:03d}.png"), rng.integers(20, 50, size=(SIZE, SIZE, 3), dtype=np.uint8))
    args = [str(model), "--calib", str(calib), "--min-calib", "8", "--holdout", str(line["images"])]
    assert calib_cli.calibrate_main([*args, "--target-false-reject", "0.1"]) == 0
    thr = load_for_model(model).thresholds
    cfg = load_config(
        None,
        {
            "model": {"path": str(model)},
            "shadow": {"path": str(line["candidate"])},
            "source": {"kind": "images", "path": str(line["images"])},
            "output": {"dir": str(tmp_path / "out"), "fsync": False},
            "http": {"enabled": True, "listen": "127.0.0.1:0"},
        },
    )
    with build_pipeline(cfg) as pipe:
        server = attach_http(pipe, cfg)
        try:
            pipe.start()
            assert pipe.join(60)
            with urllib.request.urlopen(server.url + "api/state", timeout=5) as r:
                state = json.loads(r.read())
            with urllib.request.urlopen(server.url + "api/oppoint.html", timeout=5) as r:
                page = r.read().decode()
        finally:
            server.close()
    assert state["model"]["operating_point"] == operating_point_line(thr, thr.image)
    assert state["model"]["operating_point"].startswith("operating point: threshold")
    assert state["model"]["report"] is True and f"image threshold</th><td>{thr.image:.6g} " in page
    assert state["shadow"]["compared"] == 15 and state["shadow"]["shadow_model_id"].startswith(
        "test-brightness"
    )


def test_live_view_promote_needs_the_token_and_swaps_mid_run(line: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    import urllib.error
    import urllib.request

    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.liveview.server import attach_http

    cand_alone = _run(line, tmp_path / "b", "candidate")
    live_alone = _run(line, tmp_path / "a", "live")
    out = tmp_path / "out"
    cfg = load_config(
        None,
        {
            "model": {"path": str(line["live"])},
            "shadow": {"path": str(line["candidate"])},
            "source": {"kind": "images", "path": str(line["images"]), "fps": 40, "loop": True},
            "output": {"dir": str(out), "fsync": False},
            "http": {"enabled": True, "listen": "127.0.0.1:0", "token": "s3cret"},
        },
    )

    def post(url: str, token: str | None) -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(url, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    with build_pipeline(cfg) as pipe:
        server = attach_http(pipe, cfg)
        try:
            pipe.start()
            deadline = time.monotonic() + 120  # generous: a shared CI box
            while pipe.summary()["processed"] < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert post(server.url + "api/promote", None)[0] == 401
            assert post(server.url + "api/promote", "wrong")[0] == 401
            assert pipe.model_id == load_for_model(line["live"]).model_id  # nothing changed
            status, body = post(server.url + "api/promote", "s3cret")
            assert status == 200 and body["ok"] is True
            seen = pipe.summary()["processed"]
            deadline = time.monotonic() + 120
            while pipe.summary()["processed"] < seen + 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pipe.model_id == load_for_model(line["candidate"]).model_id  # swapped in those parts
            pipe.stop()
            assert pipe.join(30)
        finally:
            server.close()
    rows = list(csv.DictReader((out / "results.csv").open()))
    ids = [r["model_id"] for r in rows]
    change = next(i for i in range(1, len(ids)) if ids[i] != ids[i - 1])
    assert ids[-1] == load_for_model(line["candidate"]).model_id and len(set(ids[change:])) == 1
    assert all(r["verdict"] == live_alone[r["path"]] for r in rows[:change])
    assert all(r["verdict"] == cand_alone[r["path"]] for r in rows[change:])
    assert [int(r["seq"]) for r in rows] == list(range(int(rows[0]["seq"]), int(rows[0]["seq"]) + len(rows)))
