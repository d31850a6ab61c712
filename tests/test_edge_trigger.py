"""Acquisition for real lines: trigger modes, device-loss recovery and the NG strobe.

viky.cti has no Trigger*/Line*/UserOutput* nodes, so the state machine is also driven by
a small fake camera written from harvesters' documented behaviour: ``fetch(timeout=...)``
raises ``genicam.gentl.TimeoutException`` when no buffer came, other ``genicam.gentl``
exceptions on transport errors, a destroyed acquirer reports ``is_valid() == False`` and
its ``fetch`` fails, node values live in ``remote_device.node_map`` and a node's
``node.invalidate_node()`` forces the next read to go to the device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pouta.edge.contract.errors import ConfigError
from pouta.edge.sources.protocol import FrameTimeout, signal_verdict
from pouta.edge.sources.replay import ArraySource

genicam = pytest.importorskip("genicam", reason="genicam (viky.cti simulator) not installed")
pytest.importorskip("harvesters.core", reason="harvesters not installed (pip install '.[camera]')")
from genicam import genapi, gentl  # noqa: E402
from pouta.edge.sources.genicam import GenICamSource  # noqa: E402
from pouta.edge.sources.genicam_nodes import StrobeConfig, TriggerConfig  # noqa: E402

VIKY = Path(genicam.__file__).parent / "viky.cti"
TRIGGER_NODES = {
    "TriggerSelector": "FrameStart",
    "TriggerMode": "Off",
    "TriggerSource": "Line0",
    "TriggerActivation": "RisingEdge",
    "TriggerSoftware": None,
}
LINE_NODES = {
    "LineSelector": "Line0",
    "LineMode": "Input",
    "LineSource": "Off",
    "UserOutputSelector": "UserOutput0",
    "UserOutputValue": False,
}
BASE_NODES = {"PixelFormat": "Mono8", "Width": 8, "Height": 6}


class FakeNode:
    """One GenApi feature: ``value`` reads/writes go to the device; ``execute`` for commands."""

    def __init__(self, camera: FakeCamera, name: str) -> None:
        self.camera, self.name = camera, name
        self.node = self  # harvesters exposes the INode as ``feature.node``

    def invalidate_node(self) -> None:
        self.camera.invalidations += 1

    @property
    def value(self) -> Any:
        self.camera.check_reachable()
        return self.camera.values[self.name]

    @value.setter
    def value(self, v: Any) -> None:
        self.camera.check_reachable()
        if self.name in self.camera.stuck:
            return  # a node that ignores writes (read-back must catch it)
        self.camera.values[self.name] = v
        self.camera.writes.append((self.name, v, time.monotonic()))

    def execute(self) -> None:
        self.camera.check_reachable()
        self.camera.executed.append(self.name)
        if self.name == "TriggerSoftware" and self.camera.triggered_by("Software"):
            self.camera.emit()


class FakeNodeMap:
    def __init__(self, camera: FakeCamera) -> None:
        self._camera = camera

    def has_node(self, name: str) -> bool:
        return name in self._camera.values

    def __getattr__(self, name: str) -> FakeNode:
        if name.startswith("_") or name not in self._camera.values:
            raise AttributeError(name)
        return FakeNode(self._camera, name)


class FakeComponent:
    def __init__(self, image: np.ndarray) -> None:
        self.data = image.ravel()
        self.height, self.width = image.shape
        self.data_format = "Mono8"


class FakeBuffer:
    def __init__(self, image: np.ndarray) -> None:
        self.payload = type("Payload", (), {"components": [FakeComponent(image)]})()
        self.timestamp_ns = 0

    def __enter__(self) -> FakeBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeAcquirer:
    def __init__(self, camera: FakeCamera) -> None:
        self.camera = camera
        self._valid = True
        self._acquiring = False
        self.remote_device = type("RemoteDevice", (), {"node_map": FakeNodeMap(camera)})()

    def is_valid(self) -> bool:
        return self._valid

    def is_acquiring(self) -> bool:
        return self._acquiring

    def start(self) -> None:
        self._acquiring = True

    def stop(self) -> None:
        self._acquiring = False

    def destroy(self) -> None:
        self._acquiring = False
        self._valid = False
        self.remote_device = None

    def fetch(self, *, timeout: float = 0) -> FakeBuffer:
        if not self._valid:
            raise IndexError("list index out of range")  # harvesters 1.4.3 on a destroyed acquirer
        if self.camera.fetch_error is not None:
            err, self.camera.fetch_error = self.camera.fetch_error, None
            raise err
        if self.camera.free_running():
            return FakeBuffer(self.camera.image())
        try:
            return FakeBuffer(self.camera.frames.get(timeout=timeout))
        except queue.Empty:
            raise gentl.TimeoutException() from None


class FakeCamera:
    """The device: survives its acquirers, can be unplugged, power-cycled or told to stall."""

    def __init__(self, nodes: dict[str, Any]) -> None:
        self.defaults = {**BASE_NODES, **nodes}
        self.values = dict(self.defaults)
        self.frames: queue.Queue[np.ndarray] = queue.Queue()
        self.writes: list[tuple[str, Any, float]] = []
        self.executed: list[str] = []
        self.stuck: set[str] = set()
        self.unplugged = False
        self.stalled = False
        self.fetch_error: BaseException | None = None
        self.opened = 0
        self.invalidations = 0
        self.count = 0

    def open(self) -> FakeAcquirer:
        if self.unplugged:
            raise gentl.NotAvailableException("device not found")
        self.opened += 1
        return FakeAcquirer(self)

    def check_reachable(self) -> None:
        if self.unplugged:
            raise genapi.RuntimeException("GVCP read timed out")

    def image(self) -> np.ndarray:
        self.count += 1
        return np.full((6, 8), self.count % 256, np.uint8)

    def emit(self) -> None:
        self.frames.put(self.image())

    def free_running(self) -> bool:
        return self.values.get("TriggerMode", "Off") == "Off" and not self.stalled and not self.unplugged

    def triggered_by(self, source: str) -> bool:
        return (
            self.values.get("TriggerMode") == "On"
            and self.values.get("TriggerSource") == source
            and not self.unplugged
        )

    def pulse(self, line: str) -> None:
        """A light barrier / PLC output on ``line``."""
        if self.triggered_by(line):
            self.emit()

    def power_cycle(self) -> None:
        self.values = dict(self.defaults)


def make_source(camera: FakeCamera, **kw: Any) -> GenICamSource:
    kw.setdefault("timeout_s", 0.05)
    kw.setdefault("min_backoff_s", 0.02)
    kw.setdefault("max_backoff_s", 0.1)
    return GenICamSource(opener=camera.open, **kw)


class Reader:
    """Calls ``read()`` in a thread like the pipeline's acquisition loop (FrameTimeouts counted)."""

    def __init__(self, src: GenICamSource) -> None:
        self.src = src
        self.frames: list[Any] = []
        self.timeouts = 0
        self.stop = threading.Event()
        src.stop_event = self.stop
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.src.read()
            except FrameTimeout:
                self.timeouts += 1
                continue
            if frame is None:
                return
            self.frames.append(frame)

    def wait_frames(self, n: int, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < end:
            time.sleep(0.01)
        return len(self.frames) >= n

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "read() did not return after stop_event"
        self.src.close()


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return bool(cond())


def test_trigger_config_parsing() -> None:
    assert TriggerConfig.parse(None).mode == "off"
    assert TriggerConfig.parse(False).mode == "off"  # YAML 1.1: bare `off`
    line = TriggerConfig.parse("LINE2", "fallingedge")
    assert (line.mode, line.source, line.activation) == ("line", "Line2", "FallingEdge")
    assert TriggerConfig.parse("software").source == "Software"
    with pytest.raises(ConfigError, match=r"source\.trigger: got a boolean"):
        TriggerConfig.parse(True)
    with pytest.raises(ConfigError, match=r"'encoder' is not a trigger mode; expected off, software, line0"):
        TriggerConfig.parse("encoder")
    with pytest.raises(ConfigError, match="trigger_activation"):
        TriggerConfig.parse("line0", "Sideways")
    assert StrobeConfig.parse({"line": 2, "pulse_ms": 20}) == StrobeConfig("Line2", "UserOutput0", 0.02)
    with pytest.raises(ConfigError, match=r"source\.strobe\.pulse_ms"):
        StrobeConfig.parse({"line": "Line1", "pulse_ms": 0})
    with pytest.raises(ConfigError, match=r"source\.nodes: TriggerMode"):
        make_source(FakeCamera({}), nodes={"TriggerMode": "On"})


def test_config_and_cli_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pouta.edge import cli
    from pouta.edge.config import load_config
    from pouta.edge.config import make_source as make_from_config

    cfg_file = tmp_path / "line.yaml"
    cfg_file.write_text("source:\n  kind: genicam\n  camera: sim\n  trigger: off\n", encoding="utf-8")
    src = make_from_config(load_config(cfg_file)["source"])
    assert isinstance(src, GenICamSource) and src.trigger.mode == "off"

    args = cli.build_parser().parse_args(
        [
            *("run", "--camera", "sim", "--trigger", "line1", "--trigger-activation", "FallingEdge"),
            *("--strobe-line", "Line2", "--strobe-ms", "20"),
        ]
    )
    src = make_from_config(load_config(None, cli._run_overrides(args))["source"])
    assert isinstance(src, GenICamSource)
    assert (src.trigger.source, src.trigger.activation) == ("Line1", "FallingEdge")
    assert (src.strobe.line, src.strobe.pulse_s) == ("Line2", 0.02)

    # The old key still works, with a deprecation warning; it cannot contradict the new one.
    with caplog.at_level(logging.WARNING, logger="pouta.edge.sources.genicam"):
        old = GenICamSource.from_config({"camera": "sim", "software_trigger": True, "trigger": "off"})
    assert old.trigger.mode == "software" and "deprecated" in caplog.text
    with pytest.raises(ConfigError, match="software_trigger: true conflicts with source.trigger: line0"):
        GenICamSource.from_config({"camera": "sim", "software_trigger": True, "trigger": "line0"})


def test_line_trigger_nodes_written_in_order_and_read_back() -> None:
    cam = FakeCamera(TRIGGER_NODES)
    src = make_source(cam, trigger=TriggerConfig.parse("line1", "FallingEdge"))
    src.open()
    written = [(n, v) for n, v, _ in cam.writes if n.startswith("Trigger")]
    assert written == [
        ("TriggerSource", "Line1"),  # TriggerSelector already FrameStart: not rewritten
        ("TriggerActivation", "FallingEdge"),
        ("TriggerMode", "On"),
    ]
    assert src.trigger_readback == {
        "TriggerSelector": "FrameStart",
        "TriggerSource": "Line1",
        "TriggerActivation": "FallingEdge",
        "TriggerMode": "On",
    }
    assert src.missing_nodes == []
    src.close()

    stuck = FakeCamera(TRIGGER_NODES)
    stuck.stuck.add("TriggerSource")
    with pytest.raises(ConfigError, match="TriggerSource: set to 'Line1' but reads back 'Line0'"):
        make_source(stuck, trigger="line1").open()


def test_trigger_off_puts_a_triggered_camera_back_to_free_running() -> None:
    cam = FakeCamera({**TRIGGER_NODES, "TriggerMode": "On"})
    src = make_source(cam, trigger="off")
    src.open()
    assert src.trigger_readback["TriggerMode"] == "Off"
    assert src.read() is not None
    src.close()


def test_line_trigger_waits_are_not_failures() -> None:
    cam = FakeCamera(TRIGGER_NODES)
    src = make_source(cam, trigger="line0", probe_s=0.2)
    src.open()
    reader = Reader(src)
    time.sleep(1.5)  # an idle line: 30 fetch timeouts, several probes
    assert reader.frames == [] and reader.timeouts == 0
    assert src.trigger_waits >= 15 and src.probes >= 3 and cam.invalidations >= 3
    assert (src.reconnects, src.device_losses, cam.opened) == (0, 0, 1)
    cam.pulse("Line1")  # another line: not our trigger
    cam.pulse("Line0")
    assert reader.wait_frames(1)
    time.sleep(0.2)
    assert len(reader.frames) == 1
    t0 = time.monotonic()
    reader.close()  # read() returns None once stop_event is set, within one fetch timeout
    assert time.monotonic() - t0 < 1.0
    assert src.reconnects == 0


def test_software_trigger_fires_before_each_fetch() -> None:
    cam = FakeCamera(TRIGGER_NODES)
    src = make_source(cam, trigger="software")
    src.open()
    frames = [src.read() for _ in range(3)]
    assert all(f is not None for f in frames) and cam.executed.count("TriggerSoftware") == 3
    src.close()


def test_device_loss_reconnects_with_backoff_and_reapplies_trigger() -> None:
    cam = FakeCamera(TRIGGER_NODES)
    src = make_source(cam, trigger="line0", probe_s=0.1)
    src.open()
    reader = Reader(src)
    # 1. a transport error during fetch: lost at once
    cam.fetch_error = gentl.IoException("stream channel closed")
    assert wait_for(lambda: src.reconnects == 1)
    assert src.device_losses == 1 and "IoException" in str(src.last_loss)
    # 2. unplugged while idle: fetches only time out, but the probe gets no answer
    cam.unplugged = True
    assert wait_for(lambda: src.device_losses == 2)
    assert "node map does not answer" in str(src.last_loss)
    assert wait_for(lambda: src.reconnect_failures >= 3)  # keeps retrying, backing off
    assert src.reconnects == 1
    cam.power_cycle()  # comes back with factory defaults
    cam.unplugged = False
    assert wait_for(lambda: src.reconnects == 2)
    assert cam.values["TriggerMode"] == "On" and cam.values["TriggerSource"] == "Line0"
    cam.pulse("Line0")
    assert reader.wait_frames(1)
    # 3. destroyed under it (another process took the device, producer reset)
    src.drop_connection()
    assert wait_for(lambda: src.reconnects == 3)
    # 4. power-cycled without losing the handle: TriggerMode reads Off again
    cam.power_cycle()
    assert wait_for(lambda: src.reconnects == 4)
    assert "camera reset" in str(src.last_loss) and cam.values["TriggerMode"] == "On"
    reader.close()
    assert reader.timeouts == 0


def test_free_running_stall_rule() -> None:
    cam = FakeCamera(TRIGGER_NODES)
    src = make_source(cam, trigger="off", reconnect_after=3)
    src.open()
    assert src.read() is not None
    cam.stalled = True
    for i in range(3):
        with pytest.raises(FrameTimeout, match="free-running"):
            src.read()
        assert src.device_losses == (1 if i == 2 else 0)
    assert src.acquirer is None and "sent nothing for 3 fetches" in str(src.last_loss)
    cam.stalled = False
    assert src.read() is not None
    assert (src.reconnects, cam.opened) == (1, 2)
    # A frame resets the count: isolated timeouts never add up to a loss.
    for _ in range(4):
        cam.stalled = True
        with pytest.raises(FrameTimeout):
            src.read()
        cam.stalled = False
        assert src.read() is not None
    assert src.reconnects == 1
    src.close()


def test_missing_nodes_named_in_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cam = FakeCamera({})  # no trigger, line or user-output nodes
    src = make_source(
        cam,
        trigger="line0",
        nodes={"ExposureTime": 500, "Width": 8},
        strobe=StrobeConfig("Line1", "UserOutput0", 0.01),
    )
    with caplog.at_level(logging.WARNING, logger="pouta.edge.sources.genicam"):
        src.open()
        src.drop_connection()
        cam.stalled = True
        reader = Reader(src)
        assert wait_for(lambda: src.reconnects == 1)
        reader.close()
    warnings = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(warnings) == 1, warnings  # not repeated on reconnect
    for name in ("ExposureTime", "TriggerSelector", "TriggerMode", "TriggerSource", "TriggerActivation"):
        assert name in warnings[0]
    assert "LineSelector, LineSource, UserOutputValue" in warnings[0] and "no NG output" in warnings[0]
    assert "may free-run" in warnings[0]
    assert not src.strobe_ready
    n = len(cam.writes)
    src.signal_verdict(True)  # no output to drive: a no-op
    time.sleep(0.05)
    assert len(cam.writes) == n


def test_strobe_pulse_on_ng() -> None:
    cam = FakeCamera({**TRIGGER_NODES, **LINE_NODES})
    src = make_source(cam, strobe=StrobeConfig("Line1", "UserOutput1", 0.15))
    src.open()
    setup = [(n, v) for n, v, _ in cam.writes if n.startswith(("Line", "UserOutput"))]
    assert setup == [
        ("LineSelector", "Line1"),
        ("LineMode", "Output"),
        ("LineSource", "UserOutput1"),
        ("UserOutputSelector", "UserOutput1"),
        ("UserOutputValue", False),  # driven low explicitly, whatever it was
    ]
    cam.writes.clear()

    def levels() -> list[tuple[bool, float]]:
        return [(v, t) for n, v, t in cam.writes if n == "UserOutputValue"]

    src.signal_verdict(False)
    signal_verdict(src, False)
    time.sleep(0.1)
    assert levels() == []
    t0 = time.monotonic()
    src.signal_verdict(True)
    assert time.monotonic() - t0 < 0.05  # signal_verdict itself never waits on the camera
    time.sleep(0.05)
    t_second = time.monotonic()
    src.signal_verdict(True)  # a second NG during the pulse extends it: one edge, not a glitch
    assert wait_for(lambda: len(levels()) == 2)
    (high, t_high), (low, t_low) = levels()
    assert high is True and low is False
    assert t_high - t0 < 0.05
    assert 0.145 <= t_low - t_second < 0.5
    assert src.stats["strobe_pulses"] == 1 and src.stats["strobe_errors"] == 0
    assert cam.values["UserOutputSelector"] == "UserOutput1"

    # The output is driven low when the source closes in the middle of a pulse.
    cam.writes.clear()
    signal_verdict(src, True)
    assert wait_for(lambda: len(levels()) == 1)
    src.close()
    assert [v for v, _ in levels()] == [True, False]


def test_signal_verdict_reaches_only_sources_that_drive_an_output() -> None:
    frames = [np.full((4, 4), i, np.uint8) for i in range(3)]
    heard: list[bool] = []

    class Strobing(ArraySource):
        def signal_verdict(self, ng: bool) -> None:
            heard.append(ng)

    strobing = Strobing(frames)
    for ng in (True, False, True):
        signal_verdict(strobing, ng)
    assert heard == [True, False, True]  # every verdict, in order, unchanged
    # A source without an output ignores verdicts: no error, and its frames are untouched.
    plain = ArraySource(frames)
    plain.open()
    first = plain.read()
    signal_verdict(plain, True)
    rest = [plain.read() for _ in range(3)]
    assert first is not None and [int(f.image[0, 0]) for f in rest[:2] if f is not None] == [1, 2]
    assert rest[2] is None and not hasattr(plain, "signal_verdict")


@pytest.mark.slow
def test_viky_software_trigger_idle_30s_then_device_destroyed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Acceptance: the runtime never reconnects while idle, and still recovers a destroyed device.

    viky has no trigger nodes, so "idle" is made by stopping its acquisition
    (AcquisitionStop): fetches then time out exactly as a triggered camera waiting for a part.
    """
    from contract_models import make_brightness_model
    from pouta.edge.config import build_pipeline, load_config

    model = make_brightness_model(tmp_path / "m.onnx", 64, 64)
    cfg = load_config(
        None,
        {
            "model": {"path": str(model)},
            "source": {
                "kind": "genicam",
                "camera": "sim",
                "cti": str(VIKY),
                "trigger": "software",
                "timeout_s": 0.5,
                "probe_s": 5.0,
                "nodes": {"Width": 128, "Height": 128, "AcquisitionFrameRate": 20.0},
            },
            "output": {"dir": str(tmp_path / "out"), "fsync": False, "overlays": "none"},
        },
    )
    with caplog.at_level(logging.WARNING, logger="pouta.edge.sources.genicam"):
        pipe = build_pipeline(cfg)
        src = pipe.source
        assert isinstance(src, GenICamSource)
        pipe.start()
    try:
        lacks = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
        assert len(lacks) == 1 and "TriggerSoftware" in lacks[0]
        assert wait_for(lambda: pipe.stats.processed >= 5, 15)
        src.acquirer.remote_device.node_map.AcquisitionStop.execute()
        time.sleep(1.0)  # buffers already in flight drain
        seen, waits = pipe.stats.processed, src.trigger_waits
        time.sleep(30.0)
        s = pipe.summary()
        assert s["processed"] == seen, "the idle camera delivered frames"
        assert s["reconnects"] == 0 and src.device_losses == 0
        assert s["timeouts"] == 0 and s["frame_errors"] == 0  # waiting is not a failure
        assert src.trigger_waits - waits >= 50 and src.probes >= 5

        src.acquirer.remote_device.node_map.AcquisitionStart.execute()  # parts again
        assert wait_for(lambda: pipe.stats.processed >= seen + 5, 15)

        first = src.acquirer
        src.drop_connection()  # destroyed under the running fetch
        assert wait_for(lambda: src.reconnects == 1, 15)
        assert src.acquirer is not first and src.device_losses == 1
        seen = pipe.stats.processed
        assert wait_for(lambda: pipe.stats.processed >= seen + 5, 15)
    finally:
        pipe.stop()
        assert pipe.join(timeout=15)
    s = pipe.summary()
    assert s["reconnects"] == 1 and s["timeouts"] == 0
