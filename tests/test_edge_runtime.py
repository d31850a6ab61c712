"""Edge runtime: folder replay, result files, faults, CLI, torch-free imports."""

from __future__ import annotations

import json
import os
import pkgutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from contract_models import dark_part, make_brightness_model
from pouta.edge import cli
from pouta.edge.config import build_pipeline, load_config
from pouta.edge.contract.errors import ConfigError, MetadataError
from pouta.edge.contract.geometry import Roi
from pouta.edge.contract.metadata import load_for_model, metadata_path
from pouta.edge.contract.preprocess import Preprocessor
from pouta.edge.pipeline import Pipeline
from pouta.edge.postprocess import PostProcessor
from pouta.edge.sinks.files import ResultWriter
from pouta.edge.sources.protocol import Frame, FrameTimeout
from pouta.edge.sources.replay import ArraySource, ImageFolderSource, label_for

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n_good: int = 6, n_bad: int = 6, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, defect, n in (("good", False, n_good), ("scratch", True, n_bad)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / name / f"{i:03d}.png"), dark_part(size, size, rng, defect))
    return root


def run_cfg(model: Path, images: Path, out: Path, **pipeline: object) -> dict:
    return load_config(
        None,
        {
            "model": {"path": str(model)},
            "source": {"kind": "images", "path": str(images)},
            "output": {"dir": str(out), "fsync": False},
            "pipeline": pipeline,
        },
    )


def test_labels_from_parent_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "test", 1, 1)
    assert label_for(root / "good" / "000.png", root) == "OK"
    assert label_for(root / "scratch" / "000.png", root) == "NG"
    assert label_for(root / "x.png", root) is None
    src = ImageFolderSource(root)
    assert sorted(src.labels) == ["NG", "OK"]


def test_folder_replay_with_labels_and_corrupt_frame(brightness_onnx: Path, tmp_path: Path) -> None:
    images = make_folder(tmp_path / "test")
    (images / "scratch" / "broken.png").write_bytes(b"\x89PNG not really")
    pipe = build_pipeline(run_cfg(brightness_onnx, images, tmp_path / "out"))
    s = pipe.run()
    assert s["corrupt"] == 1 and s["processed"] == 12 and s["dropped"] == 0
    assert s["labelled"] == 12 and s["correct"] == 12 and (s["ok"], s["ng"]) == (6, 6)
    # The corrupt frame was a part too: it gets a NOT_INSPECTED record, rejected (fail-safe).
    assert s["not_inspected"] == 1 and s["parts"] == 13
    parts = sorted((tmp_path / "out" / "parts").rglob("*.json"))
    assert len(parts) == 13 == s["written"]
    assert len(list((tmp_path / "out" / "raw").rglob("*.png"))) == 6  # raw NG frames, lossless
    records = [json.loads(p.read_text()) for p in parts]
    bad = [r for r in records if r["verdict"] == "NOT_INSPECTED"]
    assert len(bad) == 1 and bad[0]["reason"] == "corrupt_frame" and bad[0]["reject"] is True
    assert sorted(r["seq"] for r in records) == list(range(1, 14))
    assert all(r["wall_time_iso"].endswith("Z") for r in records)
    assert all(r["regions"] == [] for r in records if r["verdict"] == "OK")
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 14 and rows[0].startswith("wall_time,")
    assert len(list((tmp_path / "out" / "overlays").rglob("*.jpg"))) == 6  # NG only by default
    d = json.loads(parts[-1].read_text())
    for key in (
        "seq",
        "frame_id",
        "camera_timestamp_ns",
        "wall_time",
        "score",
        "score_norm",
        "verdict",
        "regions",
    ):
        assert key in d
    judged = [r for r in records if r["verdict"] != "NOT_INSPECTED"]
    assert all(set(r["latency_ms"]) >= {"preprocess", "infer", "postprocess", "total"} for r in judged)


def test_regions_in_source_pixels_with_roi() -> None:
    pre = Preprocessor(32, 32, roi=Roi(100, 50, 64, 64))
    from pouta.edge.contract.metadata import Thresholds

    post = PostProcessor(Thresholds(0.5, 0.5, "fixed"), min_area=10)
    amap = np.zeros((32, 32), np.float32)
    amap[4:8, 10:14] = 0.9  # 4x4 model px -> 8x8 source px at (100+20, 50+8)
    amap[20, 20] = 0.8  # 1 model px = 4 source px: below min_area
    v = post(amap[None, None], np.array([0.7]), pre.geometry((300, 300)))
    assert v.verdict == "NG" and len(v.regions) == 1
    r = v.regions[0]
    assert (r.x, r.y, r.width, r.height, r.area) == (120, 58, 8, 8, 64)
    assert r.max_score == pytest.approx(0.9)


def test_concurrent_reader_never_sees_invalid_json(brightness_onnx: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = [dark_part(64, 64, rng, i % 2 == 1) for i in range(8)]
    out = tmp_path / "out"
    sink = ResultWriter(out, overlays="none", fsync=False)
    cfg = run_cfg(brightness_onnx, tmp_path, out, policy="block")
    pipe = build_pipeline(cfg, source=ArraySource(imgs, count=150))
    pipe.sink = sink
    bad: list[str] = []
    reads = [0]
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            for p in [out / "latest.json", *list((out / "parts").rglob("*.json"))[-3:]]:
                try:
                    text = p.read_text()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(text)
                    reads[0] += 1
                except json.JSONDecodeError:
                    bad.append(text)

    t = threading.Thread(target=reader)
    t.start()
    s = pipe.run()
    done.set()
    t.join()
    assert not bad and reads[0] > 20
    assert s["written"] == 150 == len(list((out / "parts").rglob("*.json")))


def test_unwritable_output_is_counted_and_loop_continues(brightness_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sink = ResultWriter(out, overlays="all", fsync=False)
    rng = np.random.default_rng(2)
    pipe = build_pipeline(
        run_cfg(brightness_onnx, tmp_path, out, policy="block"),
        source=ArraySource([dark_part(64, 64, rng, True)], count=30),
    )
    pipe.sink = sink
    # Removing the folders under the writer is what a failed/unmounted disk looks like,
    # and works even as root (where chmod would not stop writes).
    import shutil

    for sub in ("parts", "overlays"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "parts").write_text("not a folder")
    s = pipe.run()
    assert s["processed"] == 30 and s["write_errors"] >= 30 and s["frame_errors"] == 0
    assert s["unsaved_in_memory"] == 30 and s["backlog_dropped"] == 0
    # The disk comes back: the backlog is written in order with the next part.
    (out / "parts").unlink()
    (out / "parts").mkdir()
    pipe2 = Pipeline(
        ArraySource([dark_part(64, 64, rng, False)], count=1),
        pipe.pre,
        pipe.backend,
        pipe.post,
        sink,
        policy="block",
        sequence=pipe.sequence,
    )
    s2 = pipe2.run()
    assert s2["sinks"]["files"]["failed"] == 0 and sink.backlog == 0
    files = sorted((out / "parts").rglob("*.json"))
    assert len(files) == 31  # in order, each once
    assert [json.loads(f.read_text())["seq"] for f in files] == list(range(1, 32))


def test_retention_keeps_last_files(tmp_path: Path, brightness_onnx: Path) -> None:
    out = tmp_path / "out"
    sink = ResultWriter(out, overlays="all", ng_keep_files=10, raw_ng="none", fsync=False)
    rng = np.random.default_rng(3)
    pipe = build_pipeline(
        run_cfg(brightness_onnx, tmp_path, out, policy="block"),
        source=ArraySource([dark_part(64, 64, rng, True)], count=20),
    )
    pipe.sink = sink
    pipe.run()
    kept = list((out / "parts").rglob("*.json")) + list((out / "overlays").rglob("*.jpg"))
    assert len(kept) == 10
    assert len((out / "results.csv").read_text().splitlines()) == 21


def test_results_csv_rotates_at_size_limit(tmp_path: Path, brightness_onnx: Path) -> None:
    out = tmp_path / "out"
    sink = ResultWriter(out, overlays="none", csv_max_mb=1500 / 2**20, csv_keep=2, fsync=False)
    rng = np.random.default_rng(4)
    pipe = build_pipeline(
        run_cfg(brightness_onnx, tmp_path, out, policy="block"),
        source=ArraySource([dark_part(64, 64, rng, True)], count=40),
    )
    pipe.sink = sink
    pipe.run()
    rotated = sorted(out.glob("results.*.csv"))
    assert len(rotated) == 2  # older ones deleted
    files = [*sorted(rotated, key=lambda p: p.stat().st_mtime_ns), out / "results.csv"]
    ids = []
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0].startswith("wall_time,seq,")  # header in each file
        assert f.stat().st_size <= 1500 + 300
        ids += [int(line.split(",")[1]) for line in lines[1:]]
    # the newest parts survive, in order, with no gap or duplicate
    assert ids == list(range(41 - len(ids), 41)) and len(ids) >= 5  # seq starts at 1


def test_drop_oldest_counts_drops_and_loses_no_results(brightness_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rng = np.random.default_rng(4)
    cfg = run_cfg(brightness_onnx, tmp_path, out, queue_size=1, policy="drop-oldest")
    pipe = build_pipeline(cfg, source=ArraySource([dark_part(64, 64, rng, False)], count=400))
    slow = pipe.backend.run

    def run_slowly(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.002)
        return slow(x)

    pipe.backend.run = run_slowly  # type: ignore[method-assign]
    s = pipe.run()
    assert s["dropped"] > 0 and s["processed"] + s["dropped"] == 400
    # Every dropped frame is a part with a NOT_INSPECTED record: 400 seen, 400 records.
    assert s["not_inspected"] == s["dropped"]
    assert len(list((out / "parts").rglob("*.json"))) == 400 == s["written"] == s["parts"]


def test_exception_in_one_frame_does_not_kill_the_loop(brightness_onnx: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    cfg = run_cfg(brightness_onnx, tmp_path, tmp_path / "out", policy="block")
    pipe = build_pipeline(cfg, source=ArraySource([dark_part(64, 64, rng, False)], count=10))
    real, n = pipe.backend.run, [0]

    def flaky(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n[0] += 1
        if n[0] == 3:
            raise RuntimeError("injected")
        return real(x)

    pipe.backend.run = flaky  # type: ignore[method-assign]
    s = pipe.run()
    assert s["frame_errors"] == 1 and s["processed"] == 9


def test_metadata_mismatch_refused(tmp_path: Path) -> None:
    model = make_brightness_model(tmp_path / "m.onnx", 64, 64)
    meta = load_for_model(model)
    meta.input.height = meta.input.width = 96
    meta.save(metadata_path(model))
    make_folder(tmp_path / "frames", 1, 0, size=64)  # the source is built (and checked) first
    tmp_path = tmp_path / "frames"
    with pytest.raises(MetadataError, match="96"):
        build_pipeline(run_cfg(model, tmp_path, tmp_path / "o"))
    ok = make_brightness_model(tmp_path / "ok.onnx", 64, 64)
    cfg = run_cfg(ok, tmp_path, tmp_path / "o")
    cfg["model"]["expect_kind"] = "pouta"
    with pytest.raises(MetadataError, match="model_kind"):
        build_pipeline(cfg)


def test_config_rejects_unknown_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("output:\n  dri: x\n")
    with pytest.raises(ConfigError, match="output.dri"):
        load_config(p)


def test_cli_run_exit_codes(
    brightness_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = make_folder(tmp_path / "test", 3, 3, size=64)
    rc = cli.main(
        [
            "run",
            "--model",
            str(brightness_onnx),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            "--no-fsync",
        ]
    )
    out = capsys.readouterr().out
    assert rc == cli.EXIT_OK and "verdicts right 6 / 6" in out
    assert (
        cli.main(["run", "--model", str(brightness_onnx), "--images", str(tmp_path / "nope"), "--quiet"])
        == cli.EXIT_SOURCE
    )
    assert (
        cli.main(["run", "--model", str(tmp_path / "none.onnx"), "--images", str(images), "--quiet"])
        == cli.EXIT_CONFIG
    )
    assert (
        cli.main(
            [
                "run",
                "--model",
                str(brightness_onnx),
                "--images",
                str(images),
                "--expect-kind",
                "pouta",
                "--quiet",
            ]
        )
        == cli.EXIT_CONFIG
    )


def test_sigterm_flushes_pending_results(brightness_onnx: Path, tmp_path: Path) -> None:
    images = make_folder(tmp_path / "test", 2, 2, size=64)
    out = tmp_path / "out"
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "pouta.edge.cli",
        "run",
        "--model",
        str(brightness_onnx),
        "--images",
        str(images),
    ]
    cmd += ["--loop", "--fps", "50", "--out", str(out), "--no-fsync", "--summary-json", str(summary)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (out / "latest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_OK, stderr
    s = json.loads(summary.read_text())
    assert s["stopped_by"] == "SIGTERM" and s["processed"] > 0
    assert s["written"] == s["processed"] == len(list((out / "parts").rglob("*.json")))
    assert len((out / "results.csv").read_text().splitlines()) == s["processed"] + 1


def test_edge_imports_without_torch() -> None:
    import pouta.edge as edge

    # Every module of every subpackage, so a torch import in a new sink or source fails here.
    names = [m.name for m in pkgutil.walk_packages(edge.__path__, "pouta.edge.")]
    assert {
        "pouta.edge.cli",
        "pouta.edge.pipeline",
        "pouta.edge.contract.preprocess",
        "pouta.edge.sources.genicam",
        "pouta.edge.backends.tensorrt",
        "pouta.edge.backends.cuda_memory",
        "pouta.edge.sinks.opcua",
        "pouta.edge.liveview.server",
    } <= set(names)
    assert not any("bench" in n for n in names)  # benchmarks do not ship to the line
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in the edge runtime")
        return None
sys.meta_path.insert(0, Block())
import importlib
for n in {names!r}:
    importlib.import_module(n)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_video_source_reads_frames_in_order_and_loops(tmp_path: Path) -> None:
    from pouta.edge.sources.protocol import SourceError, iterate
    from pouta.edge.sources.replay import VideoSource

    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    levels = [20, 60, 100, 140, 180, 220]
    for v in levels:
        writer.write(np.full((48, 64, 3), v, np.uint8))
    writer.release()

    src = VideoSource(str(path))
    src.open()
    frames = list(iterate(src))
    src.close()
    assert [f.frame_id for f in frames] == list(range(len(levels)))
    assert frames[0].image.shape[:2] == (48, 64)
    means = [float(f.image.mean()) for f in frames]
    assert np.allclose(means, levels, atol=6)  # JPEG-compressed, order kept

    looped = VideoSource(str(path), loop=True)
    looped.open()
    got = [looped.read() for _ in range(len(levels) + 3)]
    looped.close()
    assert all(f is not None for f in got)
    assert abs(float(got[len(levels)].image.mean()) - levels[0]) < 6  # wrapped to the start

    with pytest.raises(SourceError, match="not found"):
        VideoSource(str(tmp_path / "missing.avi")).open()


def test_no_spin_reaches_the_onnxruntime_session(brightness_onnx: Path, tmp_path: Path) -> None:
    from pouta.edge.config import make_backend

    args = cli.build_parser().parse_args(["run", "--model", str(brightness_onnx), "--no-spin"])
    cfg = load_config(None, cli._run_overrides(args))
    assert cfg["model"]["spin"] is False
    quiet = make_backend(cfg["model"])
    opts = quiet.session.get_session_options()  # type: ignore[attr-defined]
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    quiet.close()
    default = load_config(None, {"model": {"path": str(brightness_onnx)}})
    assert default["model"]["spin"] is True
    spinning = make_backend(default["model"])
    opts = spinning.session.get_session_options()  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="allow_spinning"):  # never set: the library default
        opts.get_session_config_entry("session.intra_op.allow_spinning")
    spinning.close()


def test_overlay_tints_only_near_and_above_the_pixel_threshold() -> None:
    from pouta.edge.contract.overlay import draw_overlay

    image = np.full((60, 80), 128, np.uint8)  # grayscale part
    amap = np.full((60, 80), 0.01, np.float32)  # normal: well below the threshold
    amap[20:40, 30:50] = 0.2  # defect: far above it
    pic = draw_overlay(image, amap, "NG", 0.2, pixel_threshold=0.05)
    assert pic.shape == (60, 80, 3)
    assert np.array_equal(pic[50:, 60:], np.full((10, 20, 3), 128, np.uint8))  # part untouched
    inside = pic[25:35, 35:45].astype(int)
    assert np.abs(inside - 128).max() > 40  # defect visibly coloured
    assert inside[..., 2].mean() > inside[..., 0].mean()  # 4x threshold and up reads red


class _CountingSource(ArraySource):
    closed = 0

    def close(self) -> None:
        type(self).closed += 1
        super().close()


def test_pipeline_owns_and_closes_what_it_was_built_from(tmp_path: Path) -> None:
    imgs = [dark_part(64, 64, np.random.default_rng(i), False) for i in range(3)]
    # A backend that cannot open: the source built before it is closed, nothing leaks.
    cfg = run_cfg(tmp_path / "missing.onnx", tmp_path, tmp_path / "o")
    _CountingSource.closed = 0
    with pytest.raises(ConfigError, match="model file not found"):
        build_pipeline(cfg, source=_CountingSource(imgs))
    assert _CountingSource.closed == 1
    # A pipeline that never ran closes source, backend and sinks when its block ends.
    model = make_brightness_model(tmp_path / "m.onnx", 64, 64)
    _CountingSource.closed = 0
    with build_pipeline(run_cfg(model, tmp_path, tmp_path / "o"), source=_CountingSource(imgs)) as pipe:
        closed: list[str] = []
        pipe.backend.close = lambda: closed.append("backend")  # type: ignore[method-assign]
        pipe.sinks[0].close = lambda: closed.append("files")  # type: ignore[method-assign]
    assert closed == ["files", "backend"] and _CountingSource.closed == 1
    pipe.close()  # idempotent
    assert closed == ["files", "backend"]


class _FlakyCamera(ArraySource):
    """A camera that reconnected twice, times out once on its own and once after a trigger."""

    def __init__(self, images: list[np.ndarray]) -> None:
        super().__init__(images, count=6, name="flaky")
        self.reconnects = 2
        self.reads = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"device_losses": 2}

    def read(self) -> Frame | None:
        self.reads += 1
        if self.reads == 2:
            raise FrameTimeout("free-running: nothing")
        if self.reads == 4:
            raise FrameTimeout("triggered, no frame", after_trigger=True)
        return super().read()


def test_each_counter_comes_from_its_one_owner(brightness_onnx: Path, tmp_path: Path) -> None:
    imgs = [dark_part(64, 64, np.random.default_rng(i), False) for i in range(3)]
    cfg = run_cfg(brightness_onnx, tmp_path, tmp_path / "out", policy="block")
    with build_pipeline(cfg, source=_FlakyCamera(imgs)) as pipe:
        s = pipe.run()
    # The source owns reconnects and its own stats; the pipeline owns timeouts and parts;
    # the files sink owns written.
    assert s["reconnects"] == 2 and s["source"] == {"device_losses": 2}
    assert s["timeouts"] == 2 and s["processed"] == 6
    assert s["not_inspected"] == 1 and s["parts"] == 7 == s["written"] == s["sinks"]["files"]["written"]
    reasons = [json.loads(p.read_text()).get("reason") for p in (tmp_path / "out" / "parts").rglob("*.json")]
    assert reasons.count("timeout_after_trigger") == 1
    assert "reconnects 2" in pipe.status_line() and "timeouts 2" in pipe.status_line()
