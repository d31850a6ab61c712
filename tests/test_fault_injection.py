"""Fault injection: each fault is made real (an ONNX model that emits NaN, a backend that
hangs or raises, a camera that stops, a PLC that never acks, unauthenticated network
writes, a 1 MB part id, SIGTERM under load) on loopback, in bounded time.

Every test asserts the line-side contract: no part passes (OK) without a verdict it
earned, every part seen has exactly one record, the fault state is raised while the
fault lasts and cleared after it, and nothing is lost on a clean stop.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from contract_models import dark_part, make_brightness_model
from onnx import TensorProto, helper, numpy_helper
from pouta.edge import cli
from pouta.edge.backends.onnx_runtime import OnnxRuntimeBackend
from pouta.edge.contract.errors import ConfigError, MetadataError
from pouta.edge.contract.metadata import (
    INPUT_NAME,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_SCORE,
    InputSpec,
    ModelMetadata,
    Thresholds,
    load_for_model,
    metadata_path,
)
from pouta.edge.contract.preprocess import preprocessor_for
from pouta.edge.pipeline import Pipeline
from pouta.edge.postprocess import PostProcessor
from pouta.edge.sequence import SequenceCounter
from pouta.edge.sinks.files import ResultWriter
from pouta.edge.sinks.records import PartResult
from pouta.edge.sources.protocol import Frame, FrameTimeout
from pouta.edge.sources.replay import ArraySource

SIZE = 64


# -- helpers ------------------------------------------------------------------------
def make_constant_model(path: Path, value: float) -> Path:
    """A contract model whose map and score are ``value`` everywhere (NaN, inf ...): a
    zero-weight convolution with ``value`` as its bias."""
    w = np.zeros((1, 3, 1, 1), np.float32)
    b = np.array([value], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [INPUT_NAME, "w", "b"], [OUTPUT_ANOMALY_MAP]),
            helper.make_node("ReduceMax", [OUTPUT_ANOMALY_MAP], [OUTPUT_SCORE], axes=[1, 2, 3], keepdims=0),
        ],
        "constant",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info(OUTPUT_ANOMALY_MAP, TensorProto.FLOAT, ["N", 1, SIZE, SIZE]),
            helper.make_tensor_value_info(OUTPUT_SCORE, TensorProto.FLOAT, ["N"]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    ModelMetadata(
        model_kind="test",
        variant="constant",
        input=InputSpec(height=SIZE, width=SIZE),
        thresholds=Thresholds(image=0.5, pixel=0.5, rule="fixed"),
    ).save(metadata_path(path))
    return path


class Recorder:
    """A result sink that keeps every record and every heartbeat state it was given."""

    name = "recorder"
    needs_images = False

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def write(self, result: PartResult) -> bool:
        with self.lock:
            self.records.append(result.to_dict())
        return True

    def heartbeat(self, beat: int, state: dict[str, Any]) -> None:
        with self.lock:
            self.states.append(dict(state))

    def stats(self) -> dict[str, Any]:
        return {"written": len(self.records)}

    def close(self) -> None:
        pass


class Switching:
    """A backend that runs a list of real ONNX Runtime sessions, one per phase:
    ``phases`` = [(backend, n_calls), ...]; the last one runs for ever."""

    def __init__(self, phases: list[tuple[Any, int]]) -> None:
        self.phases = phases
        self.metadata = phases[-1][0].metadata
        self.name = "switching"
        self.calls = 0

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        n = self.calls
        for backend, count in self.phases:
            if n <= count:
                return backend.run(batch)
            n -= count
        return self.phases[-1][0].run(batch)

    def close(self) -> None:
        for b, _ in self.phases:
            b.close()


class Hanging:
    """A real backend that blocks on call ``at`` until ``release`` is set (a hung GPU)."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at = inner, at
        self.metadata, self.name = inner.metadata, "hanging"
        self.release = threading.Event()
        self.hung = threading.Event()
        self.calls = 0

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls == self.at:
            self.hung.set()
            self.release.wait(20)
        return self.inner.run(batch)

    def close(self) -> None:
        self.release.set()
        self.inner.close()


class Raising:
    """A real backend that raises on calls ``first``..``last`` (a lost CUDA context)."""

    def __init__(self, inner: Any, first: int, last: int) -> None:
        self.inner, self.first, self.last = inner, first, last
        self.metadata, self.name = inner.metadata, "raising"
        self.calls = 0

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.first <= self.calls <= self.last:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.run(batch)

    def close(self) -> None:
        self.inner.close()


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [dark_part(SIZE, SIZE, rng, i % 3 == 0) for i in range(n)]


def pipeline(backend: Any, source: Any, sinks: list[Any], **kw: Any) -> Pipeline:
    meta = backend.metadata
    kw.setdefault("heartbeat_s", 0.02)
    return Pipeline(source, preprocessor_for(meta), backend, PostProcessor(meta.thresholds), sinks, **kw)


def check_contract(records: list[dict[str, Any]], n: int) -> None:
    """Every part 1..n has exactly one record, in order; an OK is always an earned one."""
    assert [r["seq"] for r in records] == list(range(1, n + 1))
    for r in records:
        if r["verdict"] == "OK":
            assert r["score"] is not None and np.isfinite(r["score"]) and r["score"] <= r["threshold"]
            assert not r["reject"]
        elif r["verdict"] == "NOT_INSPECTED":
            assert r["reject"] and r["reason"]


def fault_raised_and_cleared(rec: Recorder) -> tuple[set[str], dict[str, Any]]:
    faulted = [s for s in rec.states if s["fault"]]
    assert faulted, "the fault state was never raised"
    assert all(not s["ready"] for s in faulted)
    last = rec.states[-1]
    assert not last["fault"] and last["fault_reason"] is None, last
    return {str(s["fault_reason"]) for s in faulted}, last


def brightness(tmp_path: Path, name: str = "model.onnx") -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(make_brightness_model(tmp_path / name, SIZE, SIZE), threads=1)


# -- fail-safe verdicts ----------------------------------------------------------------------
def test_nan_and_inf_model_outputs_are_not_inspected_and_the_fault_clears(tmp_path: Path) -> None:
    nan = OnnxRuntimeBackend(make_constant_model(tmp_path / "nan.onnx", float("nan")), threads=1)
    inf = OnnxRuntimeBackend(make_constant_model(tmp_path / "inf.onnx", float("inf")), threads=1)
    good = brightness(tmp_path)
    # The NaN/inf sessions really produce NaN/inf (what an FP16 overflow would look like).
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    assert np.isnan(nan.run(x)[1]).all() and np.isinf(inf.run(x)[1]).all()
    rec = Recorder()
    images = frames(8)
    pipe = pipeline(
        Switching([(nan, 4), (inf, 4), (good, 1)]),
        ArraySource(images, fps=100, count=24),
        [rec, ResultWriter(tmp_path / "out", fsync=False)],
        policy="block",
    )
    with pipe:
        s = pipe.run()
    check_contract(rec.records, 24)
    bad, rest = rec.records[:8], rec.records[8:]
    assert all(r["verdict"] == "NOT_INSPECTED" and r["reason"] == "non_finite_score" for r in bad)
    assert all(r["verdict"] in ("OK", "NG") for r in rest) and {r["verdict"] for r in rest} == {"OK", "NG"}
    reasons, _ = fault_raised_and_cleared(rec)
    assert reasons == {"non_finite_score"}
    assert s["non_finite"] == 8 and s["not_inspected"] == 8 and s["records_lost"] == 0
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 25 and sum(",NOT_INSPECTED,1," in line for line in csv_lines) == 8


def test_nan_threshold_in_sidecar_or_config_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    images = tmp_path / "imgs"
    images.mkdir()
    import cv2

    cv2.imwrite(str(images / "a.png"), frames(1)[0])
    base = ["run", "--model", str(model), "--images", str(images), "--quiet", "--out", str(tmp_path / "o")]
    # Config and --set: NaN, inf and values outside the map's range are refused, field named.
    for value in (".nan", ".inf", "-.inf", "1.5", "-0.1"):
        for key in ("image_threshold", "pixel_threshold"):
            rc = cli.main([*base, "--set", f"postprocess.{key}={value}"])
            err = capsys.readouterr().err.strip()
            assert rc == cli.EXIT_CONFIG and f"postprocess.{key}" in err and len(err.splitlines()) == 1, err
    # The sidecar's image threshold (not only its pixel threshold) is checked.
    meta_file = metadata_path(model)
    good_sidecar = meta_file.read_text()
    for key in ("image", "pixel"):
        for bad in ("NaN", "Infinity", "2.0"):
            d = json.loads(good_sidecar)
            meta_file.write_text(good_sidecar.replace(f'"{key}": {d["thresholds"][key]}', f'"{key}": {bad}'))
            with pytest.raises(MetadataError, match=f"thresholds.{key}"):
                load_for_model(model)
            rc = cli.main(base)
            err = capsys.readouterr().err.strip()
            assert rc == cli.EXIT_CONFIG and f"thresholds.{key}" in err and len(err.splitlines()) == 1, err
    meta_file.write_text(good_sidecar)
    # A reload with a NaN threshold is refused and changes nothing.
    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.service import reload_thresholds

    config = tmp_path / "line.yaml"
    config.write_text(json.dumps({"model": {"path": str(model)}, "output": {"dir": str(tmp_path / "o2")}}))
    cfg = load_config(config)
    with build_pipeline(cfg, source=ArraySource(frames(1))) as pipe:
        config.write_text(
            json.dumps({"model": {"path": str(model)}, "postprocess": {"image_threshold": float("nan")}})
        )
        with pytest.raises(ConfigError, match="postprocess.image_threshold"):
            reload_thresholds(pipe, config)
        assert pipe.post.image_threshold == 0.5


# -- inference faults ----------------------------------------------------------------------
class StrobedSource(ArraySource):
    """A camera with a reject output: records what the pipeline signals for each part."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.strobes: list[bool] = []

    def signal_verdict(self, ng: bool) -> None:
        self.strobes.append(ng)


def test_hung_backend_trips_the_watchdog_then_verdicts_flow_again(tmp_path: Path) -> None:
    backend = Hanging(brightness(tmp_path), at=4)
    rec = Recorder()
    n = 60
    source = StrobedSource(frames(9), fps=60, count=n)
    pipe = pipeline(
        backend,
        source,
        [rec],
        verdict_timeout_s=0.3,
        queue_size=4,
    )
    pipe.start()
    try:
        assert backend.hung.wait(10)
        # While the backend is still hung, parts acquired after it get their records.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(rec.records) < 20:
            time.sleep(0.02)
        hung_records = list(rec.records)
        assert len(hung_records) >= 20 and backend.calls == 4, "records did not go out during the hang"
        assert pipe.fault == "verdict_timeout"
        assert all(r["verdict"] == "NOT_INSPECTED" for r in hung_records[3:])
    finally:
        backend.release.set()
    pipe.join(30)
    pipe.close()
    s = pipe.summary()
    check_contract(rec.records, n)
    hung = rec.records[3]
    assert hung["verdict"] == "NOT_INSPECTED" and hung["reason"] == "verdict_timeout"
    # Its late verdict was discarded: one record per part.
    assert s["late_verdicts"] == 1
    assert rec.records[-1]["verdict"] in ("OK", "NG")
    reasons, _ = fault_raised_and_cleared(rec)
    assert reasons == {"verdict_timeout"}
    assert s["parts"] == n and s["records_lost"] == 0
    # The reject output fired for every part nobody judged (fail-safe), once per part.
    assert source.strobes == [r["reject"] for r in rec.records]
    assert all(r["reject"] for r in rec.records if r["verdict"] == "NOT_INSPECTED")


def test_backend_that_raises_is_not_inspected_and_a_fault_not_a_crash(tmp_path: Path) -> None:
    rec = Recorder()
    pipe = pipeline(
        Raising(brightness(tmp_path), 3, 7), ArraySource(frames(6), fps=100, count=20), [rec], policy="block"
    )
    with pipe:
        s = pipe.run()
    check_contract(rec.records, 20)
    assert [r["reason"] for r in rec.records[2:7]] == ["inference_error"] * 5
    assert all(r["verdict"] in ("OK", "NG") for r in rec.records[7:])
    reasons, _ = fault_raised_and_cleared(rec)
    assert reasons == {"inference_error"}
    assert pipe.fatal is None and s["frame_errors"] == 5


class StallingCamera(ArraySource):
    """Triggered parts whose frames stop coming for a while (a cable pulled and plugged)."""

    def __init__(self, images: list[np.ndarray], count: int, lost: range) -> None:
        super().__init__(images, fps=100, count=count)
        self.lost = lost
        self.calls = 0

    def read(self) -> Frame | None:
        self.calls += 1
        if self.calls in self.lost:
            time.sleep(0.02)
            raise FrameTimeout("camera: triggered, no frame", after_trigger=True)
        return super().read()


def test_camera_that_stops_delivering_records_every_triggered_part(tmp_path: Path) -> None:
    rec = Recorder()
    pipe = pipeline(brightness(tmp_path), StallingCamera(frames(6), 15, range(6, 11)), [rec], policy="block")
    with pipe:
        s = pipe.run()
    check_contract(rec.records, 20)
    assert [r["reason"] for r in rec.records[5:10]] == ["timeout_after_trigger"] * 5
    reasons, _ = fault_raised_and_cleared(rec)
    assert reasons == {"no_frame"}
    assert s["timeouts"] == 5 and s["records_lost"] == 0


# -- records -------------------------------------------------------------------------
def test_part_id_is_bounded_printable_and_csv_safe(tmp_path: Path) -> None:
    ids = ["A-1", "x" * (1 << 20), '=HYPERLINK("http://evil","x")', "bad\x00id", "+1-2", "@SUM(A1)"]

    class WithIds(ArraySource):
        def read(self) -> Frame | None:
            f = super().read()
            if f is not None:
                f.part_id = ids[f.frame_id % len(ids)]
            return f

    rec = Recorder()
    out = tmp_path / "out"
    pipe = pipeline(brightness(tmp_path), WithIds(frames(6), count=6), [rec, ResultWriter(out, fsync=False)])
    with pipe:
        s = pipe.run()
    check_contract(rec.records, 6)
    assert [r["part_id"] for r in rec.records] == ["A-1", None, ids[2], None, "+1-2", "@SUM(A1)"]
    assert s["part_id_rejected"] == 2
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["part_id"] for r in rows] == ["A-1", "", "'" + ids[2], "", "'+1-2", "'@SUM(A1)"]
    assert max(len(line) for line in (out / "results.csv").read_text().splitlines()) < 1000
    modes = {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes == {0o644}, modes


def test_sequence_contiguous_across_clean_restarts_and_gap_marked_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    a = SequenceCounter(path, block=10)
    assert [a.next() for _ in range(8)] == list(range(1, 9))
    assert a.close()
    b = SequenceCounter(path, block=10)
    assert b.take_gap() is None and b.next() == 9  # clean stop: no gap
    assert [b.next() for _ in range(5)] == list(range(10, 15))
    # b "crashes" (never closed): numbers up to its reserved block's end are skipped, flagged.
    c = SequenceCounter(path, block=10)
    n = c.next()
    assert n == 19 and c.take_gap() == "crash" and c.take_gap() is None
    # The counter cannot be saved (here: its folder is a file): no number is handed out,
    # since one the file does not cover could be handed out again after a restart.
    from pouta.edge.sequence import SequenceError

    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    d = SequenceCounter(blocked / "seq.json", block=2)
    with pytest.raises(SequenceError, match="seq.json"):
        d.next()
    blocked.unlink()
    assert [d.next() for _ in range(3)] == [1, 2, 3]


def test_unsaved_sequence_counter_is_a_fault_not_a_repeat(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    rec = Recorder()
    src = ArraySource(frames(6), fps=50, count=30)
    pipe = pipeline(brightness(tmp_path), src, [rec], sequence=SequenceCounter(blocked / "seq.json", block=5))
    pipe.start()
    deadline = time.monotonic() + 10
    while pipe.unnumbered < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pipe.fault == "sequence" and not rec.records
    blocked.unlink()  # the disk accepts the counter again
    pipe.join(30)
    pipe.close()
    s = pipe.summary()
    # No part got a number the counter file did not cover; the unnumbered ones are counted.
    assert [r["seq"] for r in rec.records] == list(range(1, 31 - s["unnumbered"]))
    assert s["unnumbered"] >= 5
    reasons, _ = fault_raised_and_cleared(rec)
    assert reasons == {"sequence"}
    assert json.loads((blocked / "seq.json").read_text()) == {"next": 31 - s["unnumbered"], "clean": True}


def test_sigterm_under_load_loses_nothing_and_the_next_run_continues(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    images = tmp_path / "imgs"
    images.mkdir()
    import cv2

    for i, img in enumerate(frames(6)):
        cv2.imwrite(str(images / f"{i}.png"), img)
    out = tmp_path / "out"

    def run(extra: list[str], summary: Path) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "pouta.edge.cli", "run", "--model", str(model), "--images", str(images)]
        cmd += ["--out", str(out), "--no-fsync", "--quiet", "--summary-json", str(summary), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = run(["--loop", "--fps", "200"], tmp_path / "s1.json")
    try:
        deadline = time.monotonic() + 30
        while not (out / "latest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_OK, err
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert s1["stopped_by"] == "SIGTERM" and s1["parts"] > 10 and s1["records_lost"] == 0
    assert json.loads((out / "sequence.json").read_text()) == {"next": s1["parts"] + 1, "clean": True}
    proc2 = run(["--max-frames", "3"], tmp_path / "s2.json")
    _, err = proc2.communicate(timeout=60)
    assert proc2.returncode == cli.EXIT_OK, err
    import csv

    seqs = [int(r["seq"]) for r in csv.DictReader((out / "results.csv").open())]
    # Every part of both runs exactly once, contiguous across the clean restart.
    assert seqs == list(range(1, s1["parts"] + 4))


# -- network: unauthenticated and forged writes ------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_opcua_anonymous_and_wrong_password_writes_refused_right_user_acks(tmp_path: Path) -> None:
    pytest.importorskip("asyncua", reason="needs pouta-edge[plc]")
    import asyncio

    from asyncua import Client, ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from pouta.edge.auth import hash_password
    from pouta.edge.sinks.opcua import OpcUaResultServer

    users = tmp_path / "users.yaml"
    users.write_text(
        "users:\n"
        f"  plc: {{password_hash: '{hash_password('right', 1000)}', role: operator}}\n"
        f"  viewer: {{password_hash: '{hash_password('look', 1000)}', role: viewer}}\n"
    )
    url = f"opc.tcp://127.0.0.1:{free_port()}/pouta/"
    pki = tmp_path / "pki"
    server = OpcUaResultServer(url, handshake=True, ack_timeout_s=30.0, pki_dir=pki, users_file=users)
    rec = Recorder()
    # One part, held (handshake) until an authorised client acknowledges it.
    pipe = pipeline(brightness(tmp_path), ArraySource(frames(1), count=1), [rec, server], policy="block")
    ck, cc = tmp_path / "client_key.pem", tmp_path / "client_cert.der"
    outcome: dict[str, str] = {}

    async def session(who: str, user: str | None, password: str | None, mode: str | None) -> None:
        for _ in range(3):  # a loaded CI machine can drop a connection attempt; the verdict is not that
            await attempt(who, user, password, mode)
            if not outcome[who].startswith("no endpoint ConnectionError") or mode is None:
                return
            await asyncio.sleep(0.5)

    async def attempt(who: str, user: str | None, password: str | None, mode: str | None) -> None:
        results: list[str] = []
        try:
            c = Client(url, timeout=15)
            c.application_uri = "urn:test:plc"
            if mode is not None:
                await c.set_security_string(f"Basic256Sha256,{mode},{cc},{ck}")
            if user is not None:
                c.set_user(user)
                c.set_password(password or "")
            async with c:
                ns = await c.get_namespace_index("urn:pouta-edge")
                root = [f"{ns}:PoutaEdge"]
                seq = await c.nodes.objects.get_child([*root, f"{ns}:Result", f"{ns}:SequenceNumber"])
                verdict = await c.nodes.objects.get_child([*root, f"{ns}:Result", f"{ns}:Verdict"])
                ack = await c.nodes.objects.get_child([*root, f"{ns}:Control", f"{ns}:AckSequence"])
                control = await c.nodes.objects.get_child([*root, f"{ns}:Control"])
                n = int(await seq.read_value())
                results.append(f"read {n}")
                for name, node, value in (
                    ("verdict", verdict, ua.Variant("OK", ua.VariantType.String)),
                    ("ack", ack, ua.Variant(n, ua.VariantType.UInt64)),
                ):
                    try:
                        await node.write_value(value)
                        results.append(f"{name} written")
                    except ua.UaStatusCodeError as exc:
                        results.append(f"{name} refused {type(exc).__name__}")
                try:
                    out = await control.call_method(f"{ns}:AckResult", ua.Variant(n, ua.VariantType.UInt64))
                    results.append(f"call {out}")
                except ua.UaStatusCodeError as exc:
                    results.append(f"call refused {type(exc).__name__}")
        except ua.UaStatusCodeError as exc:
            results.append(f"login refused {type(exc).__name__}")
        except Exception as exc:
            # Before any read: the unencrypted endpoint does not exist (or a loaded machine
            # dropped the attempt). After: the part was acknowledged, so the one-part
            # pipeline finished and stopped the server under the client's feet.
            results.append(f"{'disconnected' if results else 'no endpoint'} {type(exc).__name__}")
        outcome[who] = ", ".join(results)

    async def main() -> None:
        await setup_self_signed_certificate(
            ck, cc, "urn:test:plc", "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "plc"}
        )
        for who, user, pw, mode in (
            ("anonymous", None, None, "SignAndEncrypt"),
            ("admin", "admin", "anything", "SignAndEncrypt"),
            ("wrong", "plc", "wrong", "SignAndEncrypt"),
            ("viewer", "viewer", "look", "Sign"),
            ("plain", None, None, None),
        ):
            await session(who, user, pw, mode)
        assert server.acks == 0
        await session("plc", "plc", "right", "Sign")

    pipe.start()
    try:
        deadline = time.monotonic() + 10
        while server.written < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        asyncio.run(main())
    finally:
        pipe.join(30)
        pipe.close()
    assert (
        outcome["anonymous"]
        == "read 1, verdict refused BadUserAccessDenied, ack refused BadUserAccessDenied, call refused BadUserAccessDenied"
    )
    assert outcome["admin"] == "login refused BadUserAccessDenied"
    assert outcome["wrong"] == "login refused BadUserAccessDenied"
    assert outcome["viewer"].endswith("ack refused BadUserAccessDenied, call refused BadUserAccessDenied")
    assert outcome["plain"].startswith("no endpoint")  # no NoSecurity endpoint unless asked for
    # The operator's session: the result's value is the runtime's (not writable by anyone),
    # the ack is accepted.
    assert outcome["plc"].startswith("read 1, verdict refused BadUserAccessDenied, ack written")
    assert server.acks == 1 and server.ack_timeouts == 0
    check_contract(rec.records, 1)
    assert rec.records[0]["verdict"] in ("OK", "NG")
    # The self-signed certificate was made on first start; its key is private.
    assert (pki / "server_cert.der").stat().st_size > 0 and (
        pki / "server_key.pem"
    ).stat().st_mode & 0o777 == 0o600


def test_modbus_forged_write_from_unlisted_address_refused(tmp_path: Path) -> None:
    pytest.importorskip("pymodbus", reason="needs pouta-edge[plc]")
    from pouta.edge.sinks.modbus import ModbusResultServer
    from pymodbus.client import ModbusTcpClient

    # The PLC's address is 127.0.0.2; the forger connects from 127.0.0.1.
    server = ModbusResultServer("127.0.0.1", 0, handshake=True, ack_timeout_s=0.2, allow_write=["127.0.0.2"])
    assert server.host == "127.0.0.1"
    forger = ModbusTcpClient("127.0.0.1", port=server.port)
    assert forger.connect()
    try:
        assert forger.write_registers(20, [0, 666], device_id=1).isError()  # part id
        assert forger.write_register(22, 1, device_id=1).isError()  # ack
        assert not forger.read_holding_registers(0, count=16, device_id=1).isError()  # reading is open
        assert forger.read_holding_registers(0, count=1, device_id=7).isError()  # one unit id only
    finally:
        forger.close()
    rec = Recorder()
    pipe = pipeline(brightness(tmp_path), ArraySource(frames(4), count=4), [rec, server], policy="block")
    with pipe:
        s = pipe.run()
    check_contract(rec.records, 4)
    assert all(r["part_id"] is None for r in rec.records)  # the forged id never reached a record
    st = s["sinks"]["modbus"]
    assert st["refused"] == 2 and st["acks"] == 0 and st["ack_timeouts"] == 3
    # A listed address may write; its part id belongs to exactly one part.
    server2 = ModbusResultServer("127.0.0.1", 0, allow_write=["127.0.0.0/8"])
    plc = ModbusTcpClient("127.0.0.1", port=server2.port)
    assert plc.connect()
    assert not plc.write_registers(20, [0, 77], device_id=1).isError()
    assert server2.part_id() == "77" and server2.part_id() is None
    plc.close()
    server2.close()


def test_plc_that_never_acks_delays_only_its_own_sink(tmp_path: Path) -> None:
    pytest.importorskip("pymodbus", reason="needs pouta-edge[plc]")
    from pouta.edge.sinks.modbus import RESULT_AGE, ModbusResultServer
    from pymodbus.client import ModbusTcpClient

    server = ModbusResultServer("127.0.0.1", 0, handshake=True, ack_timeout_s=0.1)
    plc = ModbusTcpClient("127.0.0.1", port=server.port)
    assert plc.connect()
    seen: list[list[int]] = []

    def poll() -> None:  # a PLC that polls the registers but never writes the ack
        while True:
            try:
                r = plc.read_holding_registers(0, count=16, device_id=1)
            except Exception:
                return
            if r.isError():
                return
            seen.append(list(r.registers))
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rec = Recorder()
    out = tmp_path / "out"
    pipe = pipeline(
        brightness(tmp_path),
        ArraySource(frames(5), fps=100, count=10),
        [rec, ResultWriter(out, fsync=False), server],
        policy="block",
        close_timeout_s=10,
    )
    with pipe:
        s = pipe.run()
    poller.join(5)
    plc.close()
    check_contract(rec.records, 10)
    st = s["sinks"]["modbus"]
    # Every result was presented, each after the ack timeout; the files and the other sinks did not wait.
    # (the last one waits at close, not counted as a timeout)
    assert st["written"] == 10 and st["acks"] == 0 and st["ack_timeouts"] == 9
    shown = [(r[2] << 16) | r[3] for r in seen if r[1] & 4]
    assert shown and shown == sorted(shown) and shown[-1] == 10
    # The shown result's age is served (seconds; the PLC compares it with its own limit).
    assert all(r[RESULT_AGE] < 60 for r in seen)
    assert s["sinks"]["files"]["written"] == 10 and s["records_lost"] == 0


def test_live_view_token_required_except_health_and_secrets_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("aiohttp", reason="needs pouta-edge[ui]")
    import urllib.error
    import urllib.request

    from pouta.edge.config import build_pipeline, load_config
    from pouta.edge.liveview.server import attach_http

    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    base = {"model": {"path": str(model)}, "output": {"dir": str(tmp_path / "o"), "fsync": False}}
    http = {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token), "require_token": True}
    cfg = load_config(None, {**base, "http": http})
    pipe = build_pipeline(cfg, source=ArraySource(frames(4), count=4))
    server = attach_http(pipe, cfg)

    def status(path: str, headers: dict[str, str] | None = None) -> int:
        try:
            return urllib.request.urlopen(
                urllib.request.Request(server.url + path, headers=headers or {}), timeout=5
            ).status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        pipe.run()
        assert status("healthz") == 200
        for path in ("", "api/state", "metrics", "api/frame.jpg", "api/ng/1.jpg"):
            assert status(path) == 401, path
            assert status(path, {"Authorization": "Bearer wrong"}) == 401, path
        assert status("api/state", {"Authorization": "Bearer s3cret-token"}) == 200
        metrics = (
            urllib.request.urlopen(
                urllib.request.Request(
                    server.url + "metrics", headers={"Authorization": "Bearer s3cret-token"}
                ),
                timeout=5,
            )
            .read()
            .decode()
        )
        assert "pouta_fault 0.0" in metrics and "pouta_records_lost_total 0.0" in metrics
    finally:
        server.close()
        pipe.close()
    # A numeric token is a config error naming the field, not a 500 later.
    cfg = load_config(None, {**base, "http": {"enabled": True, "listen": "127.0.0.1:0", "token": 1234}})
    pipe = build_pipeline(cfg, source=ArraySource(frames(1), count=1))
    with pytest.raises(ConfigError, match="http.token"):
        attach_http(pipe, cfg)
    pipe.close()
    # Beyond loopback without a token: refused before anything listens.
    from pouta.edge.liveview.page import LiveViewSink
    from pouta.edge.liveview.server import LiveServer

    view = LiveViewSink()
    with pytest.raises(ConfigError, match="token"):
        LiveServer(view, None, dict, listen="0.0.0.0:8080")
    view.close()
    # --print-config never shows a secret.
    rc = cli.main(["run", "--model", str(model), "--set", "http.token=visible-secret", "--print-config"])
    assert rc == 0 and "visible-secret" not in capsys.readouterr().out


# -- service: unit, sd_notify, signals, exit codes ---------------------------------------------
def test_unit_is_hardened_and_its_input_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pouta.edge.service import install_service

    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    config = tmp_path / "line3.yaml"
    config.write_text(
        f"model: {{path: {model}}}\nsource: {{kind: genicam, camera: '0'}}\noutput: {{dir: out}}\n"
    )
    unit = install_service(config, dry_run=True).splitlines()
    for line in (
        "Type=notify",
        "User=pouta-edge",
        "WatchdogSec=30",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        f"ReadWritePaths={tmp_path / 'out'}",
        "CapabilityBoundingSet=",
        "MemoryMax=4G",
        "RestartPreventExitStatus=2",
        "Restart=on-failure",
    ):
        assert line in unit, line
    assert any(line.startswith("ProtectHome=") for line in unit)
    assert not any(line.startswith("AmbientCapabilities") for line in unit)
    # Port 502: the one capability it needs, nothing else.
    config.write_text(config.read_text() + "modbus: {enabled: true, port: 502}\n")
    unit = install_service(config, dry_run=True).splitlines()
    assert (
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit
        and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit
    )
    # Input that would inject unit lines is a one-line error naming the option.
    units = tmp_path / "units"
    for args, field in (
        (["--user", "pouta\nExecStartPre=/bin/sh -c id"], "--user"),
        (["--name", "edge\n[Service]"], "--name"),
        (["--memory-max", "4G\nUser=root"], "--memory-max"),
    ):
        rc = cli.main(["install-service", "--config", str(config), "--unit-dir", str(units), *args])
        err = capsys.readouterr().err.strip()
        assert rc == cli.EXIT_CONFIG and field in err and len(err.splitlines()) == 1, err
    assert not units.exists()


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    import os
    import socket

    import cv2

    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    images = tmp_path / "imgs"
    images.mkdir()
    for i, img in enumerate(frames(4)):
        cv2.imwrite(str(images / f"{i}.png"), img)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"}
    cmd = [sys.executable, "-m", "pouta.edge.cli", "run", "--model", str(model), "--images", str(images)]
    cmd += ["--loop", "--fps", "30", "--out", str(tmp_path / "out"), "--no-fsync", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while got.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            try:
                got.append(sock.recv(256).decode())
            except TimeoutError:
                continue
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while "STOPPING=1" not in got and time.monotonic() < end:
            try:
                got.append(sock.recv(256).decode())
            except TimeoutError:
                continue
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == cli.EXIT_OK, err
    assert got[0] == "READY=1" and got.count("WATCHDOG=1") >= 3 and "STOPPING=1" in got, got


def test_watchdog_pings_only_while_inference_makes_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from pouta.edge.service import SystemdWatchdog

    sock_path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "300000")
    wd = SystemdWatchdog()
    wd.ping(alive=False)  # a stuck inference thread: systemd must not hear from us
    with pytest.raises(TimeoutError):
        sock.recv(64)
    wd.ping(alive=True)
    assert sock.recv(64) == b"WATCHDOG=1"
    sock.close()


def test_signals_during_model_load_are_handled_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    import cv2
    from pouta.edge import config as config_module

    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), frames(1)[0])
    real_build = config_module.build_pipeline
    delivered: list[str] = []

    def slow_build(cfg: dict[str, Any], source: Any = None) -> Pipeline:
        # SIGHUP and SIGTERM arrive while the model is loading (a TensorRT engine takes minutes).
        os.kill(os.getpid(), signal.SIGHUP)
        delivered.append("SIGHUP")
        os.kill(os.getpid(), signal.SIGTERM)
        delivered.append("SIGTERM")
        return real_build(cfg, source)

    monkeypatch.setattr(config_module, "build_pipeline", slow_build)
    before = signal.getsignal(signal.SIGHUP)
    rc = cli.main(
        [
            "run",
            "--model",
            str(model),
            "--images",
            str(images),
            "--loop",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert delivered == ["SIGHUP", "SIGTERM"]
    # Stopped cleanly (exit 0: systemd does not restart a deliberate stop), never killed by SIGHUP.
    assert rc == cli.EXIT_OK and "stopped by SIGTERM while loading" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGHUP) == before


def test_corrupt_or_swapped_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2
    from pouta.edge.contract.fsutil import sha256_file

    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), frames(1)[0])
    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    base = ["run", "--images", str(images), "--out", str(tmp_path / "o"), "--quiet", "--no-fsync"]
    # Truncated file.
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    rc = cli.main([*base, "--model", str(model)])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_CONFIG and str(model) in err and len(err.splitlines()) == 1, err
    # Swapped: the sidecar's artifact_sha256 names another file.
    model.write_bytes(data)
    meta = load_for_model(model)
    meta.artifact_sha256 = sha256_file(model)
    meta.save(metadata_path(model))
    assert cli.main([*base, "--model", str(model)]) == cli.EXIT_OK
    capsys.readouterr()
    make_brightness_model(model, SIZE, SIZE, level=0.9, with_metadata=False)
    rc = cli.main([*base, "--model", str(model)])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_CONFIG and "artifact_sha256" in err and len(err.splitlines()) == 1, err
    assert cli.main([*base, "--model", str(model), "--allow-modified-model"]) == cli.EXIT_OK


def test_port_not_bindable_yet_exits_5_for_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pymodbus", reason="needs pouta-edge[plc]")
    import socket

    import cv2

    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), frames(1)[0])
    model = make_brightness_model(tmp_path / "model.onnx", SIZE, SIZE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli.main(
            [
                "run",
                "--model",
                str(model),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "o"),
                "--quiet",
                "--modbus",
                str(port),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_UNAVAILABLE == 5 and "modbus" in err and len(err.splitlines()) == 1, err


def test_images_run_as_a_non_root_user() -> None:
    root = Path(__file__).resolve().parents[1] / "docker"
    files = sorted(root.glob("Dockerfile*"))
    assert files
    for f in files:
        lines = [
            ln.split(None, 1) for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ]
        users = [i for i, ln in enumerate(lines) if ln[0] == "USER"]
        assert users, f"{f.name}: no USER"
        user = lines[users[-1]][1].split(":")[0].strip()
        assert user not in ("root", "0"), f"{f.name}: runs as {user}"
        # Nothing after the last USER switches back or runs as root.
        assert not any(ln[0] == "RUN" for ln in lines[users[-1] :]), f.name
        entry = next(i for i, ln in enumerate(lines) if ln[0] == "ENTRYPOINT")
        assert entry > users[-1], f.name


def test_mqtt_security_keys_checked_and_client_ids_unique(tmp_path: Path) -> None:
    pytest.importorskip("paho.mqtt", reason="needs pouta-edge[mqtt]")
    from pouta.edge.config import load_config, make_sinks

    port = free_port()  # nothing listens: the publishers only build their clients
    base = {
        "output": {"dir": str(tmp_path / "o")},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port},
    }
    for mq, field in (
        ({"tls": True, "ca_file": str(tmp_path / "missing-ca.pem")}, "mqtt.ca_file"),
        ({"cert_file": str(tmp_path / "c.pem")}, "mqtt.cert_file"),
        ({"password_env": "POUTA_TEST_UNSET_VARIABLE"}, "mqtt.password_env"),
    ):
        cfg = load_config(None, {**base, "mqtt": {**base["mqtt"], **mq}})
        with pytest.raises(ConfigError, match=field):
            make_sinks(cfg)
    secret = tmp_path / "mqtt.pw"
    secret.write_text("pw\n")
    cfg = load_config(
        None, {**base, "mqtt": {**base["mqtt"], "username": "edge", "password_file": str(secret)}}
    )
    a, b = make_sinks(cfg)[1], make_sinks(cfg)[1]
    try:
        # Two runtimes on one box must not take each other's broker session.
        assert a.client_id != b.client_id and a.client_id.startswith("pouta-edge-")
    finally:
        for s in (a, b):
            s.close(flush_timeout_s=0.1)


def test_default_run_exposes_nothing_beyond_loopback(tmp_path: Path) -> None:
    from urllib.parse import urlparse

    from pouta.edge.config import load_config
    from pouta.edge.liveview.page import is_loopback, parse_listen

    cfg = load_config(None)
    assert is_loopback(cfg["modbus"]["host"])
    assert is_loopback(str(urlparse(cfg["opcua"]["endpoint"]).hostname))
    assert is_loopback(parse_listen(cfg["http"]["listen"])[0])
    assert "None" not in cfg["opcua"]["security"]
    # Flags that switch a server on without naming an address keep it on loopback.
    args = cli.build_parser().parse_args(["run", "--modbus", "5020", "--http", "8080"])
    cfg = load_config(None, cli._run_overrides(args))
    assert is_loopback(cfg["modbus"]["host"]) and is_loopback(parse_listen(cfg["http"]["listen"])[0])
    # The real listening socket of a server built with its defaults.
    pytest.importorskip("pymodbus", reason="needs pouta-edge[plc]")
    from pouta.edge.sinks.modbus import ModbusResultServer

    server = ModbusResultServer(port=0)
    try:
        bound = {s.getsockname()[0] for s in server._server.transport.sockets}
        assert bound == {"127.0.0.1"}
    finally:
        server.close()
