"""GenICam cameras through harvesters (GenTL producers), including the viky.cti simulator.

Facts this module relies on (harvesters 1.4.3 + genicam 1.6, checked with viky.cti):
one ``Harvester`` per process; ``ImageAcquirer.fetch(timeout=...)`` honours its timeout
only when acquisition was started without ``run_as_thread=True`` and then raises
``genicam.gentl.TimeoutException``; a GenTL failure during a fetch (e.g. the acquirer
destroyed under it) raises another ``genicam.gentl`` exception, and a destroyed acquirer
reports ``is_valid() == False``; harvesters silently drops incomplete buffers (it only
emits ``Events.INCOMPLETE_BUFFER``); a fetched buffer's ``component.data`` is a view
into the driver's buffer (copied before the buffer is queued back by ``with``), and
harvesters does not strip line padding itself. There is no disconnect event, so loss is
detected from fetch errors, a dead node map, or (free-running only) a stalled stream,
and recovered with ``destroy()`` + ``update()`` + ``create({...})``. viky has no
Trigger*, Line*, UserOutput*, ExposureTime or Gain nodes and no buffer timestamps.

Acquisition rules (SFNC names):
- ``trigger: off`` (free-running): ``TriggerMode=Off`` where the camera has it; a fetch
  timeout is a ``FrameTimeout`` and ``reconnect_after`` of them in a row mean the camera
  is lost.
- ``trigger: software | lineN``: ``TriggerSelector=FrameStart``, ``TriggerSource``,
  ``TriggerActivation`` (lines only), ``TriggerMode=On``, each read back. A fetch timeout
  only means "no part yet": ``read`` keeps waiting (never a failure, never a reconnect),
  returning ``None`` once its ``stop_event`` is set. While idle the node map is read every
  ``probe_s``; no answer (or ``TriggerMode`` no longer ``On`` after a power cycle) means
  the camera is lost.
- Any fetch error other than a timeout, or an invalid acquirer, means the camera is lost:
  it is destroyed and re-created with backoff (``reconnects`` counts successes).

Longer than ~350 lines on purpose: mostly one class, the acquisition state machine
(open, trigger, fetch, lose, reconnect), whose steps share two locks; node-map helpers
are in ``genicam_nodes``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..contract.errors import ConfigError, ImageReadError
from .genicam_nodes import (
    SUPPORTED_FORMATS,
    TRIGGER_HELP,
    TRIGGER_NODES,
    PulseOutput,
    StrobeConfig,
    TriggerConfig,
    apply_settings,
    apply_trigger,
    convert,
    set_user_output,
    setup_strobe,
)
from .protocol import Frame, FrameTimeout, SourceError

log = logging.getLogger("pouta.edge.sources.genicam")

# Read while a triggered camera is idle to tell "no part yet" from "camera gone".
PROBE_NODES = ("TriggerMode", "PixelFormat", "Width")


_HARVESTER: Any = None
_HARVESTER_LOCK = threading.Lock()
_HARVESTER_FILES: set[str] = set()


def find_cti(cti: str | None) -> str:
    """The producer to load: explicit path, ``sim``, or ``$GENICAM_GENTL64_PATH``."""
    if cti == "sim":
        return simulator_cti()
    if cti:
        if not Path(cti).is_file():
            raise SourceError(f"{cti}: GenTL producer (.cti) not found")
        return str(cti)
    for folder in os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep):
        if folder and Path(folder).is_dir():
            found = sorted(Path(folder).glob("*.cti"))
            if found:
                return str(found[0])
    raise SourceError(
        "no GenTL producer: pass --cti FILE.cti, set source.cti, or set GENICAM_GENTL64_PATH "
        "(or use --camera sim for the simulator)"
    )


def simulator_cti() -> str:
    try:
        import genicam
    except ImportError:
        raise SourceError(
            "--camera sim: the 'genicam' package is not installed (pip install genicam)"
        ) from None
    path = Path(genicam.__file__).parent / "viky.cti"
    if not path.is_file():
        raise SourceError(f"{path}: simulator producer missing from the genicam package")
    return str(path)


def harvester(cti: str) -> Any:
    """The process-wide Harvester, with ``cti`` loaded (GenTL producers dislike a second instance)."""
    global _HARVESTER
    try:
        from harvesters.core import Harvester
    except ImportError:
        raise SourceError("GenICam cameras need harvesters: pip install 'pouta-edge[camera]'") from None
    with _HARVESTER_LOCK:
        if _HARVESTER is None:
            _HARVESTER = Harvester()
        if cti not in _HARVESTER_FILES:
            _HARVESTER.add_file(cti)
            _HARVESTER_FILES.add(cti)
            _HARVESTER.update()
        return _HARVESTER


def list_cameras(cti: str | None) -> list[dict[str, Any]]:
    h = harvester(find_cti(cti))
    with _HARVESTER_LOCK:
        h.update()
        infos = list(h.device_info_list)
    out = []
    for i, info in enumerate(infos):
        d = {"index": i}
        for key in ("id_", "serial_number", "model", "vendor", "display_name", "tl_type"):
            try:
                d[key.rstrip("_")] = getattr(info, key)
            except Exception:
                d[key.rstrip("_")] = None
        out.append(d)
    return out


class GenICamSource:
    """A GenICam camera as a ``FrameSource``: trigger modes, device-loss recovery, NG strobe.

    ``opener`` makes a started-or-not acquirer (harvesters' ``ImageAcquirer`` API); by
    default it is created from the producer by serial/id/index. Tests pass their own.
    """

    def __init__(
        self,
        cti: str | None = None,
        camera: int | str | None = 0,
        serial: str | None = None,
        device_id: str | None = None,
        pixel_format: str | None = None,
        nodes: dict[str, Any] | None = None,
        trigger: TriggerConfig | str = "off",
        strobe: StrobeConfig | None = None,
        timeout_s: float = 1.0,
        reconnect_after: int = 3,
        probe_s: float = 5.0,
        max_backoff_s: float = 10.0,
        min_backoff_s: float = 0.2,
        opener: Callable[[], Any] | None = None,
    ) -> None:
        if camera == "sim":
            cti, camera = cti or "sim", 0
        self.cti = find_cti(cti) if opener is None else str(cti or "custom")
        self.index = int(camera) if camera not in (None, "") else 0
        self.serial = serial
        self.device_id = device_id
        self.settings: dict[str, Any] = dict(nodes or {})
        clash = [n for n in TRIGGER_NODES if n in self.settings]
        if clash:
            raise ConfigError(
                f"source.nodes: {', '.join(clash)} are set by source.trigger ({TRIGGER_HELP}); remove them"
            )
        if pixel_format:
            if pixel_format not in SUPPORTED_FORMATS:
                raise ConfigError(
                    f"source.pixel_format: {pixel_format!r}, expected one of {SUPPORTED_FORMATS}"
                )
            self.settings["PixelFormat"] = pixel_format
        self.trigger = trigger if isinstance(trigger, TriggerConfig) else TriggerConfig.parse(trigger)
        self.strobe = strobe or StrobeConfig()
        self.timeout_s = float(timeout_s)
        self.reconnect_after = max(1, int(reconnect_after))
        self.probe_s = float(probe_s)
        self.max_backoff_s = float(max_backoff_s)
        self.min_backoff_s = float(min_backoff_s)
        self._opener = opener or self._open_harvesters
        self.name = f"genicam:{Path(self.cti).name}:{serial or device_id or self.index}"
        self.acquirer: Any = None
        self.missing_nodes: list[str] = []
        self.trigger_readback: dict[str, str] = {}
        self.strobe_ready = False
        self.reconnects = 0  # successful re-creations after a loss
        self.reconnect_failures = 0
        self.device_losses = 0
        self.trigger_waits = 0  # triggered: fetch timeouts while waiting for a part (not failures)
        self.probes = 0
        self.incomplete_frames = 0  # buffers harvesters dropped as incomplete
        self.last_loss: str | None = None
        self._stalled = 0
        self._last_probe = 0.0
        self._soft_trigger = False
        self._frame_id = 0
        self._key: Any = None
        self._lock = threading.Lock()  # one acquisition step at a time
        self._io_lock = threading.Lock()  # node-map writes vs destroy (strobe thread, probes)
        self._pulse: PulseOutput | None = None
        self.stop_event: threading.Event | None = None

    @classmethod
    def from_config(cls, s: dict[str, Any]) -> GenICamSource:
        trigger = s.get("trigger")
        if s.get("software_trigger"):
            # Deprecated alias kept so existing line configs keep working.
            if TriggerConfig.parse(trigger).mode not in ("off", "software"):
                raise ConfigError(
                    f"source.software_trigger: true conflicts with source.trigger: {trigger}; "
                    "remove software_trigger (deprecated alias of trigger: software)"
                )
            log.warning("source.software_trigger is deprecated; use trigger: software (--trigger software)")
            trigger = "software"
        return cls(
            cti=s.get("cti"),
            camera=s.get("camera"),
            serial=s.get("serial"),
            device_id=s.get("device_id"),
            pixel_format=s.get("pixel_format"),
            nodes=s.get("nodes") or {},
            trigger=TriggerConfig.parse(trigger, s.get("trigger_activation")),
            strobe=StrobeConfig.parse(s.get("strobe")),
            timeout_s=float(s.get("timeout_s") or 1.0),
            reconnect_after=int(s.get("reconnect_after") or 3),
            probe_s=float(s.get("probe_s") or 5.0),
            max_backoff_s=float(s.get("max_backoff_s") or 10.0),
        )

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for summaries and status lines."""
        pulse = self._pulse
        return {
            "trigger": self.trigger.label,
            "reconnects": self.reconnects,
            "reconnect_failures": self.reconnect_failures,
            "device_losses": self.device_losses,
            "trigger_waits": self.trigger_waits,
            "incomplete_frames": self.incomplete_frames,
            "strobe_pulses": pulse.pulses if pulse else 0,
            "strobe_errors": pulse.errors if pulse else 0,
        }

    # -- connection ----------------------------------------------------------
    def _search_key(self, h: Any) -> Any:
        if self.serial:
            return {"serial_number": str(self.serial)}
        if self.device_id:
            return {"id_": str(self.device_id)}
        infos = h.device_info_list
        if self.index >= len(infos):
            raise SourceError(f"{self.cti}: camera index {self.index} not found ({len(infos)} device(s))")
        # Reconnect to the same device even if the list order changes after update().
        info = infos[self.index]
        try:
            return {"serial_number": info.serial_number}
        except Exception:
            return self.index

    def _open_harvesters(self) -> Any:
        h = harvester(self.cti)
        with _HARVESTER_LOCK:
            h.update()
            if self._key is None:
                self._key = self._search_key(h)
            try:
                ia = h.create(self._key)
            except Exception as exc:
                raise SourceError(f"{self.name}: cannot open camera {self._key} ({exc})") from None
        _count_incomplete_buffers(ia, self)
        return ia

    def _configure(self, ia: Any) -> None:
        nm = ia.remote_device.node_map
        # Trigger first: user nodes such as TriggerDelay apply to the selected (FrameStart) trigger.
        missing_trigger, self.trigger_readback = apply_trigger(nm, self.trigger)
        missing_nodes = apply_settings(nm, self.settings)
        missing_strobe = setup_strobe(nm, self.strobe) if self.strobe.enabled else []
        self.strobe_ready = self.strobe.enabled and not missing_strobe
        self._soft_trigger = self.trigger.mode == "software" and nm.has_node("TriggerSoftware")
        if nm.has_node("PixelFormat"):
            fmt = str(nm.PixelFormat.value)
            if fmt not in SUPPORTED_FORMATS:
                raise ConfigError(
                    f"{self.name}: camera PixelFormat is {fmt!r}; set source.pixel_format to one of "
                    f"{SUPPORTED_FORMATS}"
                )
        missing = missing_nodes + missing_trigger + missing_strobe
        if missing and missing != self.missing_nodes:
            ignored = []
            if missing_nodes:
                ignored.append(f"source.nodes {', '.join(missing_nodes)}")
            if missing_trigger:
                ignored.append(
                    f"trigger {self.trigger.label} ({', '.join(missing_trigger)}): the camera may free-run"
                )
            if missing_strobe:
                ignored.append(f"strobe on {self.strobe.line} ({', '.join(missing_strobe)}): no NG output")
            log.warning("%s: camera lacks node(s); ignored: %s", self.name, "; ".join(ignored))
        self.missing_nodes = missing

    def _connect(self) -> None:
        try:
            ia = self._opener()
        except (ConfigError, SourceError):
            raise
        except Exception as exc:
            raise SourceError(f"{self.name}: cannot open camera ({exc})") from None
        try:
            self._configure(ia)
            # Not run_as_thread: only then does fetch() honour its timeout.
            ia.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                ia.destroy()
            if isinstance(exc, ConfigError | SourceError) or not isinstance(exc, Exception):
                raise
            raise SourceError(f"{self.name}: cannot start acquisition ({exc})") from None
        with self._io_lock:
            self.acquirer = ia
        self._stalled = 0
        self._last_probe = time.monotonic()

    def open(self) -> None:
        with self._lock:
            self._pulse = None  # a closed source reopened gets a fresh output thread
            self._connect()

    def _destroy(self) -> None:
        with self._io_lock:
            ia, self.acquirer = self.acquirer, None
        if ia is None:
            return
        with contextlib.suppress(Exception):
            ia.stop()
        try:
            ia.destroy()
        except Exception as exc:
            log.debug("destroy failed: %s", exc)

    def drop_connection(self) -> None:
        """Destroy the acquirer under the running fetch, as a lost camera would (tests, operators)."""
        with self._io_lock:
            ia = self.acquirer
            if ia is not None:
                ia.destroy()

    def _lose(self, why: str) -> None:
        self.device_losses += 1
        self.last_loss = why
        log.warning("%s: camera lost (%s); reconnecting", self.name, why)
        self._destroy()

    def _stopped(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def _reconnect(self) -> bool:
        """Re-create the acquirer with backoff; False when stopped first."""
        delay = self.min_backoff_s
        while True:
            self._destroy()
            try:
                self._connect()
                self.reconnects += 1
                log.warning("%s: reconnected (%d so far)", self.name, self.reconnects)
                return True
            except SourceError as exc:
                self.reconnect_failures += 1
                log.warning("%s: reconnect failed (%s); retrying in %.1f s", self.name, exc, delay)
            stop = self.stop_event
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _alive(self, ia: Any) -> bool:
        """Read a node from the device itself (cache invalidated): a lost camera cannot answer."""
        self.probes += 1
        try:
            with self._io_lock:
                nm = ia.remote_device.node_map
                name = next((n for n in PROBE_NODES if nm.has_node(n)), None)
                if name is None:
                    return True  # nothing to read: only fetch errors can tell
                node = getattr(nm, name)
                node.node.invalidate_node()
                value = str(node.value)
        except Exception as exc:
            self.last_loss = f"node map does not answer ({type(exc).__name__})"
            return False
        expected = self.trigger_readback.get("TriggerMode")
        if name == "TriggerMode" and expected is not None and value != expected:
            # A power-cycled camera comes back with its defaults: re-apply everything.
            self.last_loss = f"TriggerMode reads {value!r}, expected {expected!r} (camera reset?)"
            return False
        return True

    # -- frames --------------------------------------------------------------
    def read(self) -> Frame | None:
        """The next frame; with a trigger on, waits for a part until one comes or ``stop_event``."""
        timeout_exc = _gentl_timeout()
        while True:
            with self._lock:
                ia = self.acquirer
                if ia is None or not ia.is_valid():
                    if ia is not None:
                        self._lose("acquirer no longer valid")
                    if not self._reconnect():
                        return None
                    ia = self.acquirer
                try:
                    if self._soft_trigger:
                        with self._io_lock:
                            ia.remote_device.node_map.TriggerSoftware.execute()
                    buffer = ia.fetch(timeout=self.timeout_s)
                except timeout_exc:
                    if not self.trigger.waits_for_parts:
                        self._stall()
                        raise FrameTimeout(
                            f"{self.name}: no frame within {self.timeout_s} s (free-running)"
                        ) from None
                    self.trigger_waits += 1  # no part yet: not a failure
                    self._probe_if_due(ia)
                    if self._stopped():
                        return None
                    continue
                except Exception as exc:
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    self._lose(f"{type(exc).__name__}: {first}".rstrip(": "))
                    continue
                self._stalled = 0
                try:
                    with buffer:
                        comp = buffer.payload.components[0]
                        fmt, w, h = comp.data_format, int(comp.width), int(comp.height)
                        image, order = convert(comp.data, fmt, w, h)
                        ts = _timestamp_ns(buffer)
                except Exception as exc:
                    raise ImageReadError(f"{self.name}: unusable buffer ({exc})") from None
                fid = self._frame_id
                self._frame_id += 1
                if self.trigger.waits_for_parts:
                    # Also while parts flow: a camera reset to free-running would never time out.
                    self._probe_if_due(ia)
            return Frame(image, fid, ts, self.name, color_order=order)

    def _probe_if_due(self, ia: Any) -> None:
        if time.monotonic() - self._last_probe < self.probe_s:
            return
        self._last_probe = time.monotonic()
        if not self._alive(ia):
            self._lose(str(self.last_loss))

    def _stall(self) -> None:
        """The free-running rule: ``reconnect_after`` fetch timeouts in a row mean the camera is lost."""
        self._stalled += 1
        if self._stalled >= self.reconnect_after:
            self._lose(f"free-running camera sent nothing for {self._stalled} fetches of {self.timeout_s} s")
        return True

    # -- outputs -------------------------------------------------------------
    def signal_verdict(self, ng: bool) -> None:
        """Pulse the strobe line for an NG part (no-op without one); never blocks, never raises."""
        if not ng or not self.strobe_ready:
            return
        if self._pulse is None:
            self._pulse = PulseOutput(self._write_strobe, self.strobe.pulse_s, self.name)
        self._pulse.fire()

    def _write_strobe(self, level: bool) -> None:
        with self._io_lock:
            ia = self.acquirer
            if ia is None:
                raise SourceError("camera not connected")
            set_user_output(ia.remote_device.node_map, self.strobe, level)

    def close(self) -> None:
        if self._pulse is not None:
            self._pulse.close()
        with self._lock:
            self._destroy()


def _gentl_timeout() -> type[BaseException]:
    try:
        from genicam.gentl import TimeoutException
    except ImportError:
        raise SourceError("GenICam cameras need genicam: pip install 'pouta-edge[camera]'") from None
    return TimeoutException


def _count_incomplete_buffers(ia: Any, source: GenICamSource) -> None:
    # harvesters drops incomplete buffers inside fetch(); its callback is the only trace of them.
    try:
        from harvesters.core import Callback

        class Counter(Callback):
            def emit(self, context: object = None) -> None:
                source.incomplete_frames += 1

        ia.add_callback(ia.Events.INCOMPLETE_BUFFER, Counter())
    except Exception as exc:
        log.debug("incomplete-buffer callback unavailable: %s", exc)


def _timestamp_ns(buffer: Any) -> int:
    # Many producers (viky included) have no buffer timestamps: fall back to the host clock.
    try:
        ts = int(buffer.timestamp_ns)
        if ts > 0:
            return ts
    except Exception:
        pass
    return time.time_ns()
