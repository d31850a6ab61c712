"""Operator feedback over real HTTP on loopback: a real pipeline run with ONNX Runtime, the
live view's server, and the files, sidecars, metrics and refusals it leaves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from contract_models import dark_part, make_brightness_model
from test_liveview import get, metric_values, run_cfg

pytest.importorskip("aiohttp")

from pouta.calibration.thresholds.holdout import holdout_sets
from pouta.edge.config import build_pipeline
from pouta.edge.contract.metadata import load_for_model
from pouta.edge.liveview.feedback import reason_folder, safe_name
from pouta.edge.liveview.server import attach_http
from pouta.edge.sources.replay import ArraySource


def post(url: str, body: Any, token: str | None = "s3cret") -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def records(out: Path) -> dict[int, dict[str, Any]]:
    return {d["seq"]: d for d in (json.loads(p.read_text()) for p in (out / "parts").rglob("*.json"))}


def test_feedback_files_the_judged_frame_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(5)
    frames = [dark_part(96, 96, rng, i % 4 == 3) for i in range(8)]
    out = tmp_path / "out"
    http = {"enabled": True, "listen": "127.0.0.1:0", "token": "s3cret", "feedback_frames": 8}
    cfg = run_cfg(model, None, out, http=http)
    pipe = build_pipeline(cfg, source=ArraySource(frames, count=16))
    server = attach_http(pipe, cfg)
    fb = out / "feedback"
    url = server.url + "api/feedback"
    try:
        pipe.run()
        recs = records(out)
        assert [s for s, d in sorted(recs.items()) if d["verdict"] == "NG"] == [4, 8, 12, 16]

        # Refusals: one line each, and nothing written.
        refusals = [
            ({"seq": 16, "label": "false_reject"}, None, 401, "token"),
            ({"seq": 16, "label": "false_reject"}, "wrong", 401, "token"),
            ({"seq": 99, "label": "false_reject"}, "s3cret", 404, "no part 99"),
            ({"seq": 0, "label": "false_reject"}, "s3cret", 404, "no part 0"),
            ({"seq": 4, "label": "false_reject"}, "s3cret", 410, "no longer kept"),  # only the last 8
            ({"seq": 13, "label": "false_reject"}, "s3cret", 409, "judged OK"),
            ({"seq": 16, "label": "missed"}, "s3cret", 409, "judged NG"),
            ({"seq": 13, "label": "missed", "reason": "Good"}, "s3cret", 400, "good part"),
            ({"seq": 13, "label": "maybe"}, "s3cret", 400, "label"),
            ({"seq": "13", "label": "missed"}, "s3cret", 400, "expected JSON"),
            (b"not json", "s3cret", 400, "expected JSON"),
        ]
        for body, token, code, words in refusals:
            status, text = post(url, body, token)
            assert (status, "\n" in text.strip()) == (code, False), (body, status, text)
            assert words in text, (body, text)
        assert not fb.exists()

        # A false reject: the NG part's own frame in feedback/good, with its record beside it.
        status, text = post(url, {"seq": 16, "label": "false_reject"})
        assert status == 200, text
        png = fb / "good" / "0000000016.png"
        assert json.loads(text)["path"] == str(png)
        assert np.array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED), frames[15 % 8])
        side = json.loads(png.with_suffix(".json").read_text())
        rec = recs[16]
        assert {k: side[k] for k in ("seq", "part_id", "model_id", "verdict", "score", "threshold")} == {
            k: rec[k] for k in ("seq", "part_id", "model_id", "verdict", "score", "threshold")
        }
        assert side["label"] == "false_reject" and side["judged_at"] == rec["wall_time_iso"]
        # A missed defect under a free-text reason made safe; the OK part's own frame.
        status, text = post(url, {"seq": 13, "label": "missed", "reason": "Deep scratch / edge!"})
        assert status == 200, text
        missed = fb / "deep_scratch_edge" / "0000000013.png"
        assert np.array_equal(cv2.imread(str(missed), cv2.IMREAD_UNCHANGED), frames[12 % 8])
        assert json.loads(missed.with_suffix(".json").read_text())["verdict"] == "OK"
        status, text = post(url, {"seq": 11, "label": "missed"})
        assert status == 200 and (fb / "missed" / "0000000011.png").is_file()
        # The same part twice is filed once.
        assert post(url, {"seq": 16, "label": "false_reject"})[0] == 409
        assert sorted(p.relative_to(fb).as_posix() for p in fb.rglob("*.png")) == [
            "deep_scratch_edge/0000000013.png",
            "good/0000000016.png",
            "missed/0000000011.png",
        ]

        m = metric_values(get(server.url + "metrics").decode())
        assert m[("pouta_feedback_total", (("label", "false_reject"),))] == 1
        assert m[("pouta_feedback_total", (("label", "missed"),))] == 2
        state = json.loads(get(server.url + "api/state"))
        assert state["feedback"]["counts"] == {"false_reject": 1, "missed": 2}
    finally:
        server.close()

    # feedback/ is a labelled test split as it stands (MVTec layout: good/ + defect folders).
    h_norm, h_def, split = holdout_sets(
        load_for_model(model),
        SimpleNamespace(preprocessor=pipe.pre),
        None,
        fb,  # type: ignore[arg-type]
    )
    assert split.endswith("(labelled split)")
    assert h_norm is not None and len(h_norm) == 1
    assert h_def is not None and len(h_def) == 2


def test_feedback_is_refused_without_a_token_configured(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(5)
    frames = [dark_part(96, 96, rng, True) for _ in range(2)]
    cfg = run_cfg(model, None, tmp_path / "out", http={"enabled": True, "listen": "127.0.0.1:0"})
    pipe = build_pipeline(cfg, source=ArraySource(frames, count=2))
    server = attach_http(pipe, cfg)
    try:
        pipe.run()
        status, text = post(server.url + "api/feedback", {"seq": 1, "label": "false_reject"})
        assert status == 403 and "read-only" in text
        assert not (tmp_path / "out" / "feedback").exists()
    finally:
        server.close()


def test_reason_names_are_safe_folder_names() -> None:
    assert reason_folder(None) == reason_folder("  ") == reason_folder("../..") == "missed"
    assert reason_folder("Scratch") == "scratch"
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert len(reason_folder("x" * 200)) == 40
