"""GenICam cameras through harvesters (GenTL producers), including the viky.cti simulator.

Facts this module relies on (harvesters 1.4.3 + genicam 1.6, checked with viky.cti):
one ``Harvester`` per process; ``ImageAcquirer.fetch(timeout=...)`` honours its timeout
only when acquisition was started without ``run_as_thread=True``; a fetched buffer's
``component.data`` is a view into the driver's buffer (copied before the buffer is
queued back by ``with``), and harvesters does not strip line padding itself; there is
no disconnect event, so loss is detected from repeated timeouts/errors and recovered
with ``destroy()`` + ``update()`` + ``create({...})``. viky has no Trigger*, ExposureTime
or Gain nodes and no buffer timestamps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import ConfigError
from .sources import Frame, FrameTimeout, SourceError

log = logging.getLogger("pouta.edge.genicam")

# OpenCV names Bayer patterns by the 2x2 block starting at pixel (1, 1), GenICam (PFNC)
# by the one at (0, 0): BayerRG8 (R at 0,0) is OpenCV's BayerBG (== BayerRGGB).
BAYER_CODES: dict[str, int] = {
    "BayerRG8": cv2.COLOR_BayerRGGB2BGR,
    "BayerBG8": cv2.COLOR_BayerBGGR2BGR,
    "BayerGB8": cv2.COLOR_BayerGBRG2BGR,
    "BayerGR8": cv2.COLOR_BayerGRBG2BGR,
}
MONO_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono14": 14, "Mono16": 16}
COLOR_FORMATS = {"RGB8": (3, "RGB"), "BGR8": (3, "BGR"), "RGBa8": (4, "RGB"), "BGRa8": (4, "BGR")}
SUPPORTED_FORMATS = tuple(MONO_BITS) + tuple(COLOR_FORMATS) + tuple(BAYER_CODES)
# Settings are applied in this order: the pixel format and geometry change what is valid
# for the rest (e.g. the frame-rate maximum).
NODE_ORDER = ("PixelFormat", "Width", "Height", "OffsetX", "OffsetY")


def convert(data: np.ndarray, pixel_format: str, width: int, height: int) -> tuple[np.ndarray, str]:
    """Flat buffer data -> (image, colour order): HxW uint8/uint16 or HxWx3/4 uint8.

    Rows may carry padding at their end; whatever is beyond ``width`` pixels is cut.
    Mono10/12/14 are shifted to the full 16-bit range so downstream scaling is uniform.
    The result is always a fresh array (never a view into the driver's buffer).
    """
    if pixel_format in MONO_BITS:
        bits = MONO_BITS[pixel_format]
        dtype = np.uint8 if bits == 8 else np.uint16
        rows = np.asarray(data).view(dtype) if data.dtype != dtype else np.asarray(data)
        img = rows.reshape(height, -1)[:, :width]
        if bits in (8, 16):
            return img.copy(), "BGR"
        return np.left_shift(img, 16 - bits), "BGR"
    if pixel_format in COLOR_FORMATS:
        ch, order = COLOR_FORMATS[pixel_format]
        img = np.asarray(data, dtype=np.uint8).reshape(height, -1)[:, : width * ch]
        return img.reshape(height, width, ch).copy(), order
    if pixel_format in BAYER_CODES:
        raw = np.asarray(data, dtype=np.uint8).reshape(height, -1)[:, :width]
        return cv2.cvtColor(np.ascontiguousarray(raw), BAYER_CODES[pixel_format]), "BGR"
    raise SourceError(f"pixel format {pixel_format!r} is not supported, expected one of {SUPPORTED_FORMATS}")


def apply_settings(node_map: Any, settings: dict[str, Any]) -> list[str]:
    """Set each node that exists; return the names the camera lacks (reported by the caller).

    A node that exists but rejects the value is a configuration error naming node and value.
    """
    missing: list[str] = []
    names = [n for n in NODE_ORDER if n in settings] + [n for n in settings if n not in NODE_ORDER]
    for name in names:
        value = settings[name]
        if not node_map.has_node(name):
            missing.append(name)
            continue
        node = getattr(node_map, name)
        try:
            if value == "execute" and hasattr(node, "execute"):
                node.execute()
            else:
                node.value = value
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"camera node {name}: cannot set {value!r} ({first})") from None
    return missing


def trigger_settings(software_trigger: bool) -> dict[str, Any]:
    if not software_trigger:
        return {}
    return {"TriggerSelector": "FrameStart", "TriggerMode": "On", "TriggerSource": "Software"}


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
    """A GenICam camera as a ``FrameSource``; reconnects by itself after repeated timeouts."""

    def __init__(
        self,
        cti: str | None = None,
        camera: int | str | None = 0,
        serial: str | None = None,
        device_id: str | None = None,
        pixel_format: str | None = None,
        nodes: dict[str, Any] | None = None,
        software_trigger: bool = False,
        timeout_s: float = 1.0,
        reconnect_after: int = 3,
        max_backoff_s: float = 10.0,
    ) -> None:
        if camera == "sim":
            cti, camera = cti or "sim", 0
        self.cti = find_cti(cti)
        self.index = int(camera) if camera not in (None, "") else 0
        self.serial = serial
        self.device_id = device_id
        self.settings: dict[str, Any] = dict(nodes or {})
        if pixel_format:
            if pixel_format not in SUPPORTED_FORMATS:
                raise ConfigError(
                    f"source.pixel_format: {pixel_format!r}, expected one of {SUPPORTED_FORMATS}"
                )
            self.settings["PixelFormat"] = pixel_format
        self.software_trigger = software_trigger
        self.settings.update(trigger_settings(software_trigger))
        self.timeout_s = float(timeout_s)
        self.reconnect_after = max(1, int(reconnect_after))
        self.max_backoff_s = float(max_backoff_s)
        self.name = f"genicam:{Path(self.cti).name}:{serial or device_id or self.index}"
        self.acquirer: Any = None
        self.missing_nodes: list[str] = []
        self.reconnects = 0
        self.timeouts = 0
        self._consecutive_failures = 0
        self._frame_id = 0
        self._key: Any = None
        self._lock = threading.Lock()
        self.stop_event: threading.Event | None = None

    @classmethod
    def from_config(cls, s: dict[str, Any]) -> GenICamSource:
        return cls(
            cti=s.get("cti"),
            camera=s.get("camera"),
            serial=s.get("serial"),
            device_id=s.get("device_id"),
            pixel_format=s.get("pixel_format"),
            nodes=s.get("nodes") or {},
            software_trigger=bool(s.get("software_trigger")),
            timeout_s=float(s.get("timeout_s") or 1.0),
            reconnect_after=int(s.get("reconnect_after") or 3),
            max_backoff_s=float(s.get("max_backoff_s") or 10.0),
        )

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

    def _connect(self) -> None:
        h = harvester(self.cti)
        with _HARVESTER_LOCK:
            h.update()
            if self._key is None:
                self._key = self._search_key(h)
            try:
                ia = h.create(self._key)
            except Exception as exc:
                raise SourceError(f"{self.name}: cannot open camera {self._key} ({exc})") from None
        try:
            nm = ia.remote_device.node_map
            if self.software_trigger and not nm.has_node("TriggerSoftware"):
                raise ConfigError(
                    f"{self.name}: software trigger requested but the camera has no TriggerSoftware node"
                )
            missing = apply_settings(nm, self.settings)
            if missing and missing != self.missing_nodes:
                log.warning(
                    "%s: camera lacks node(s) %s; those settings are ignored", self.name, ", ".join(missing)
                )
            self.missing_nodes = missing
            # Not run_as_thread: only then does fetch() honour its timeout.
            ia.start()
        except BaseException:
            ia.destroy()
            raise
        self.acquirer = ia

    def open(self) -> None:
        with self._lock:
            self._connect()

    def _destroy(self) -> None:
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
        """Destroy the acquirer as a lost camera would; the next reads reconnect (tests, operators)."""
        with self._lock:
            ia = self.acquirer
            if ia is not None:
                ia.destroy()

    def _reconnect(self) -> None:
        delay = 0.2
        while True:
            self._destroy()
            try:
                self._connect()
                self.reconnects += 1
                self._consecutive_failures = 0
                log.warning("%s: reconnected (%d so far)", self.name, self.reconnects)
                return
            except SourceError as exc:
                log.warning("%s: reconnect failed (%s); retrying in %.1f s", self.name, exc, delay)
            stop = self.stop_event
            if stop is not None and stop.wait(delay):
                raise FrameTimeout(f"{self.name}: stopped while reconnecting")
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    # -- frames --------------------------------------------------------------
    def read(self) -> Frame | None:
        with self._lock:
            ia = self.acquirer
            if ia is None or not ia.is_valid():
                self._reconnect()
                ia = self.acquirer
            try:
                if self.software_trigger:
                    ia.remote_device.node_map.TriggerSoftware.execute()
                with ia.fetch(timeout=self.timeout_s) as buffer:
                    comp = buffer.payload.components[0]
                    fmt, w, h = comp.data_format, int(comp.width), int(comp.height)
                    image, order = convert(comp.data, fmt, w, h)
                    ts = _timestamp_ns(buffer)
            except Exception as exc:
                self._consecutive_failures += 1
                self.timeouts += 1
                if self._consecutive_failures >= self.reconnect_after:
                    log.warning(
                        "%s: %d fetches failed in a row; reconnecting", self.name, self._consecutive_failures
                    )
                    self._reconnect()
                raise FrameTimeout(
                    f"{self.name}: no frame within {self.timeout_s} s ({type(exc).__name__})"
                ) from None
            self._consecutive_failures = 0
            fid = self._frame_id
            self._frame_id += 1
        return Frame(image, fid, ts, self.name, color_order=order)

    def close(self) -> None:
        with self._lock:
            self._destroy()


def _timestamp_ns(buffer: Any) -> int:
    # Many producers (viky included) have no buffer timestamps: fall back to the host clock.
    try:
        ts = int(buffer.timestamp_ns)
        if ts > 0:
            return ts
    except Exception:
        pass
    return time.time_ns()
