"""Live view, /metrics, score drift, SIGHUP reload and the systemd unit.

The browser test runs `pouta-edge run --http` as a process on a replayed folder and
drives Debian's headless chromium through chromedriver (selenium); it skips with the
reason only where no browser is installed (`.ci/run` installs one with apt-get).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from contract_models import dark_part, make_brightness_model

pytest.importorskip("aiohttp", reason="the live view needs the [ui] extra (aiohttp)")
prom_parser = pytest.importorskip("prometheus_client.parser", reason="the [ui] extra (prometheus-client)")

from pouta.calibration.thresholds.rules import calibrate_thresholds  # noqa: E402
from pouta.edge import cli  # noqa: E402
from pouta.edge.config import build_pipeline, load_config  # noqa: E402
from pouta.edge.contract.metadata import load_for_model, metadata_path  # noqa: E402
from pouta.edge.liveview.server import attach_http  # noqa: E402
from pouta.edge.sources.replay import ArraySource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n_good: int, n_bad: int, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, defect, n in (("good", False, n_good), ("scratch", True, n_bad)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / name / f"{i:03d}.png"), dark_part(size, size, rng, defect))
    return root


def run_cfg(model: Path, images: Path | None, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    o: dict[str, Any] = {
        "model": {"path": str(model)},
        "output": {"dir": str(out), "fsync": False},
        "pipeline": {"policy": "block"},  # in-memory sources are faster than inference: keep every part
        **sections,
    }
    if images is not None:
        o["source"] = {"kind": "images", "path": str(images)}
    return load_config(None, o)


def calibrated_model(tmp: Path, margin: float = 3.0) -> Path:
    """Brightness model whose sidecar thresholds and normal-score statistics come from
    the runtime's own scores of good parts, through the project's calibration rules."""
    model = make_brightness_model(tmp / "model.onnx")
    good = make_folder(tmp / "calib", 24, 0, seed=7) / "good"
    build_pipeline(run_cfg(model, good, tmp / "calib_out")).run()
    scores = [json.loads(p.read_text())["score"] for p in (tmp / "calib_out" / "parts").rglob("*.json")]
    meta = load_for_model(model)
    meta.thresholds = calibrate_thresholds(
        scores, rule="normal-max-margin", margin=margin, pixel_rule="fixed", pixel_value=0.5
    )
    meta.save(metadata_path(model))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def file_counts(out: Path) -> dict[str, int]:
    counts = {"OK": 0, "NG": 0, "NOT_INSPECTED": 0}
    for p in (out / "parts").rglob("*.json"):
        counts[json.loads(p.read_text())["verdict"]] += 1
    return counts


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in prom_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    return None


def non_blank(png: Path) -> None:
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 500 and img.shape[1] > 800
    assert float(img.std()) > 20.0
    colours = np.unique((img // 16).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, panels, the part's picture: not one flat colour


def test_browser_shows_live_verdict_counters_and_ng_strip(tmp_path: Path) -> None:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = calibrated_model(tmp_path)
    images = make_folder(tmp_path / "line", 10, 5)
    out = tmp_path / "out"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pouta.edge.cli", "run", "--model", str(model), "--images", str(images)]
    cmd += [
        "--fps",
        "4",
        "--out",
        str(out),
        "--no-fsync",
        "--quiet",
        "--summary-json",
        str(tmp_path / "s.json"),
    ]
    token = tmp_path / "token"
    token.write_text("op-s3cret\n")
    cmd += ["--http", f"127.0.0.1:{port}", "--http-hold", "60", "--http-token-file", str(token)]
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    driver = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(base + "/healthz", 1.0)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
                time.sleep(0.1)
        opts = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium") or "chromium"
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        driver.get(base + "/")
        driver.execute_script("window.__sameDocument = 42;")
        first = driver.find_element(By.ID, "count-parts").text
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        # The run ends while the page stays open: it updated without a reload.
        wait.until(lambda d: d.find_element(By.ID, "run-state").text.lower() == "finished")
        assert driver.execute_script("return window.__sameDocument") == 42
        counts = file_counts(out)
        assert sum(counts.values()) == 15 and counts["NG"] == 5
        wait.until(lambda d: d.find_element(By.ID, "count-parts").text == "15")
        assert first != "15"
        assert driver.find_element(By.ID, "count-ok").text == str(counts["OK"])
        assert driver.find_element(By.ID, "count-ng").text == str(counts["NG"])
        assert driver.find_element(By.ID, "count-ni").text == str(counts["NOT_INSPECTED"])
        latest = json.loads((out / "latest.json").read_text())
        assert driver.find_element(By.ID, "verdict").text == latest["verdict"] == "NG"
        assert driver.find_element(By.ID, "last-seq").text == f"#{latest['seq']}"
        assert driver.find_element(By.ID, "score-norm").text == f"{latest['score_norm']:.2f}"
        # NG thumbnails are real decoded images; the live picture was drawn while watched.
        wait.until(
            lambda d: (
                d.execute_script(
                    "return [...document.querySelectorAll('.ng-thumb img')].filter(i => i.naturalWidth > 0).length"
                )
                == 5
            )
        )
        wait.until(lambda d: d.execute_script("return document.getElementById('live-img').naturalWidth") > 0)
        shot = tmp_path / "liveview.png"
        assert driver.save_screenshot(str(shot))
        non_blank(shot)
        # Full picture with its regions.
        driver.find_elements(By.CSS_SELECTOR, ".ng-thumb")[0].click()
        wait.until(lambda d: d.execute_script("return document.getElementById('modal-img').naturalWidth") > 0)
        rows = driver.find_elements(By.CSS_SELECTOR, "#modal-table tr")
        assert len(rows) == len(latest["regions"]) >= 1
        assert len(driver.find_elements(By.CSS_SELECTOR, "#modal-regions rect")) == len(rows)
        driver.save_screenshot(str(tmp_path / "liveview_ng.png"))
        driver.find_element(By.ID, "modal-close").click()

        # Operator feedback: a false reject on an NG part files that part's frame in feedback/good.
        mark = driver.find_elements(By.CSS_SELECTOR, ".mark.false-reject")[0]
        seq = int(mark.get_attribute("data-seq"))
        mark.click()  # no token typed yet: refused, nothing written
        wait.until(lambda d: "refused" in d.find_element(By.ID, "fb-msg").text)
        assert not (out / "feedback").exists()
        assert not driver.find_element(By.ID, "mark-missed").is_displayed()  # the last part is NG
        driver.find_element(By.ID, "fb-token").send_keys("op-s3cret")
        mark.click()
        wait.until(lambda d: "filed" in d.find_element(By.ID, "fb-msg").text)
        filed = out / "feedback" / "good" / f"{seq:010d}.png"
        rec = next(
            d for d in (json.loads(p.read_text()) for p in (out / "parts").rglob("*.json")) if d["seq"] == seq
        )
        assert rec["verdict"] == "NG"
        assert np.array_equal(cv2.imread(str(filed)), cv2.imread(rec["path"]))
        assert json.loads(filed.with_suffix(".json").read_text())["label"] == "false_reject"
        assert [p.name for p in (out / "feedback").rglob("*.png")] == [filed.name]
        wait.until(lambda d: "false rejects 1" in d.find_element(By.ID, "fb-counts").text)

        # /metrics: the parser reads it, and its counters are the result files.
        m = metric_values(get(base + "/metrics").decode())
        for verdict, n in counts.items():
            assert m[("pouta_parts_total", (("verdict", verdict),))] == n
        assert m[("pouta_frames_dropped_total", ())] == 0
        assert m[("pouta_stage_latency_seconds_count", (("stage", "infer"),))] == counts["OK"] + counts["NG"]
        assert m[("pouta_score_normalised_count", ())] == counts["OK"] + counts["NG"]
        assert m[("pouta_write_errors_total", ())] == 0
        assert m[("pouta_feedback_total", (("label", "false_reject"),))] == 1
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert proc.returncode == cli.EXIT_OK, (tmp_path / "run.log").read_text()


def _brighter(img: np.ndarray, delta: int) -> np.ndarray:
    return np.clip(img.astype(np.int16) + delta, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("delta", [0, 10], ids=["unshifted", "brighter"])
def test_score_drift_gauge_follows_a_brightness_shift(
    tmp_path: Path, delta: int, caplog: pytest.LogCaptureFixture
) -> None:
    model = calibrated_model(tmp_path)
    rng = np.random.default_rng(3)
    frames = [_brighter(dark_part(96, 96, rng, False), delta) for _ in range(12)]
    cfg = run_cfg(
        model,
        None,
        tmp_path / "out",
        http={"enabled": True, "listen": "127.0.0.1:0", "drift_warn_ratio": 1.5},
    )
    pipe = build_pipeline(cfg, source=ArraySource(frames, count=48))
    server = attach_http(pipe, cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="pouta.edge.drift"):
            pipe.run()
            m = metric_values(get(server.url + "metrics").decode())
            state = json.loads(get(server.url + "api/state"))
    finally:
        server.close()
    ok = file_counts(tmp_path / "out")["OK"]
    assert ok >= 20  # the shift stays below the threshold: drift shows before rejects do
    ratio = m[("pouta_score_drift_ratio", ())]
    assert state["drift"]["ratio"] == pytest.approx(ratio, abs=1e-3)
    warned = any("score drift" in r.getMessage() for r in caplog.records)
    if delta == 0:
        assert 0.7 < ratio < 1.3 and m[("pouta_score_drift_warning", ())] == 0
        assert not state["drift"]["warning"] and not warned
    else:
        assert ratio > 1.5 and m[("pouta_score_drift_warning", ())] == 1
        assert state["drift"]["warning"] and warned


def test_pictures_only_while_watched_and_reload_needs_the_token(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(5)
    frames = [dark_part(96, 96, rng, i % 4 == 3) for i in range(8)]
    cfg = run_cfg(
        model, None, tmp_path / "out", http={"enabled": True, "listen": "127.0.0.1:0", "token": "s3cret"}
    )
    pipe = build_pipeline(cfg, source=ArraySource(frames, count=16))
    server = attach_http(pipe, cfg, reload=lambda: {"image_threshold": 0.5, "pixel_threshold": 0.5})
    try:
        pipe.run()
        s = json.loads(get(server.url + "api/state"))
        # Nobody watched: no live picture was taken, only the NG parts for the strip.
        assert s["picture"]["seq"] is None and s["view"]["rendered"] == 0
        assert s["view"]["unwatched"] == s["counts"]["OK"] == 12
        assert [r["seq"] for r in s["ng"]] == [16, 12, 8, 4] and all(r["thumb"] for r in s["ng"])
        assert get(server.url + "api/ng/16/thumb.jpg")[:2] == b"\xff\xd8"
        url = server.url + "api/reload"
        for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 401)):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers), timeout=5)
            assert exc.value.code == code
        req = urllib.request.Request(url, method="POST", headers={"Authorization": "Bearer s3cret"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["ok"] is True
    finally:
        server.close()
    # Read-only by default: no token, no state change.
    cfg2 = run_cfg(model, None, tmp_path / "out2", http={"enabled": True, "listen": "127.0.0.1:0"})
    pipe2 = build_pipeline(cfg2, source=ArraySource(frames, count=1))
    server2 = attach_http(pipe2, cfg2)
    try:
        pipe2.run()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(
                urllib.request.Request(server2.url + "api/reload", method="POST"), timeout=5
            )
        assert exc.value.code == 403
    finally:
        server2.close()


def test_sighup_reloads_thresholds_without_dropping_parts(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "model.onnx")
    images = make_folder(tmp_path / "line", 3, 3, size=64)
    out = tmp_path / "out"
    config = tmp_path / "line3.yaml"
    base = {
        "model": {"path": str(model)},
        "source": {"kind": "images", "path": str(images), "fps": 40, "loop": True},
        "output": {"dir": str(out), "fsync": False, "overlays": "none", "raw_ng": "none"},
    }
    config.write_text(json.dumps(base))
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "pouta.edge.cli", "run", "--config", str(config), "--quiet"]
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([*cmd, "--summary-json", str(summary)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while len(list((out / "parts").rglob("*.json"))) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        config.write_text(json.dumps({**base, "postprocess": {"image_threshold": 0.999}}))
        proc.send_signal(signal.SIGHUP)
        while "thresholds reloaded" not in (tmp_path / "run.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode == cli.EXIT_OK, text
    assert "thresholds reloaded: image 0.999" in text
    s = json.loads(summary.read_text())
    records = sorted(
        (json.loads(p.read_text()) for p in (out / "parts").rglob("*.json")), key=lambda r: r["seq"]
    )
    # Every part has its record, in order, none dropped or left uninspected.
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)) == list(range(1, s["parts"] + 1))
    assert s["dropped"] == 0 and s["not_inspected"] == 0
    thresholds = [r["threshold"] for r in records]
    switch = thresholds.index(0.999)
    assert switch >= 20 and set(thresholds[:switch]) == {0.5} and set(thresholds[switch:]) == {0.999}
    assert len(records) - switch >= 5
    # Each part judged entirely with one threshold.
    assert all((r["verdict"] == "NG") == (r["score"] > r["threshold"]) for r in records)
    assert any(r["verdict"] == "NG" for r in records[:switch])
    assert all(r["verdict"] == "OK" for r in records[switch:])


def test_install_service_writes_a_systemd_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_brightness_model(tmp_path / "model.onnx")
    config = tmp_path / "line3.yaml"
    config.write_text(
        f"model: {{path: {model}}}\nsource: {{kind: genicam, camera: '0'}}\nhttp: {{enabled: true, listen: '0.0.0.0:8080'}}\n"
    )
    units = tmp_path / "units"
    assert cli.main(["install-service", "--config", str(config), "--unit-dir", str(units), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not units.exists()  # dry run: nothing written
    assert (
        cli.main(["install-service", "--config", str(config), "--unit-dir", str(units), "--user", "pouta"])
        == 0
    )
    unit = (units / "pouta-edge.service").read_text()
    assert unit.replace("User=pouta\nGroup=pouta\n", "User=pouta-edge\nGroup=pouta-edge\n") == printed
    lines = unit.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start == f"ExecStart={sys.executable} -m pouta.edge.cli run --config {config} --quiet"
    for line in (
        "[Unit]",
        "After=network-online.target",
        "[Service]",
        "User=pouta",
        f"WorkingDirectory={tmp_path}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StandardOutput=journal",
        "StandardError=journal",
        "[Install]",
        "WantedBy=multi-user.target",
    ):
        assert line in lines, line
    assert "User=pouta-edge" in printed  # no --user in the dry run: the dedicated user, not root
    # A config that cannot run alone is refused with the field named.
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {kind: genicam}\n")
    assert cli.main(["install-service", "--config", str(bad), "--unit-dir", str(units)]) == cli.EXIT_CONFIG
    assert "model.path is not set" in capsys.readouterr().err
    assert not (units / "bad.service").exists() and os.listdir(units) == ["pouta-edge.service"]
