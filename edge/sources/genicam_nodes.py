"""GenICam node map and pixel formats: buffer conversion, SFNC node writes, the
FrameStart trigger and the NG strobe output (``genicam.GenICamSource`` uses them)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..contract.errors import ConfigError
from .protocol import SourceError

log = logging.getLogger("pouta.edge.sources.genicam")

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
TRIGGER_NODES = ("TriggerSelector", "TriggerMode", "TriggerSource", "TriggerActivation")
TRIGGER_ACTIVATIONS = ("RisingEdge", "FallingEdge", "AnyEdge", "LevelHigh", "LevelLow")
TRIGGER_HELP = "off, software, line0, line1, ..."


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


def write_node(node_map: Any, name: str, value: Any) -> None:
    """Set one existing node; a value it already holds is not written (read-only nodes stay fine).

    A node that rejects the value is a configuration error naming node and value.
    """
    node = getattr(node_map, name)
    try:
        if value == "execute" and hasattr(node, "execute"):
            node.execute()
            return
        with contextlib.suppress(Exception):  # write-only nodes cannot be read
            if str(node.value) == str(value):
                return
        node.value = value
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"camera node {name}: cannot set {value!r} ({first})") from None


def read_back(node_map: Any, name: str, value: Any) -> str:
    got = str(getattr(node_map, name).value)
    if got != str(value):
        raise ConfigError(f"camera node {name}: set to {value!r} but reads back {got!r}")
    return got


def apply_settings(node_map: Any, settings: dict[str, Any]) -> list[str]:
    """Set each node that exists; return the names the camera lacks (reported by the caller)."""
    missing: list[str] = []
    names = [n for n in NODE_ORDER if n in settings] + [n for n in settings if n not in NODE_ORDER]
    for name in names:
        if node_map.has_node(name):
            write_node(node_map, name, settings[name])
        else:
            missing.append(name)
    return missing


@dataclass(frozen=True)
class TriggerConfig:
    """The FrameStart trigger: ``off`` (free-running), ``software`` or a line (``Line0`` ...)."""

    mode: str = "off"  # off | software | line
    source: str | None = None  # SFNC TriggerSource: Software, Line0, Line1, ...
    activation: str = "RisingEdge"

    @classmethod
    def parse(
        cls, value: Any, activation: Any = "RisingEdge", where: str = "source.trigger"
    ) -> TriggerConfig:
        # YAML 1.1 reads a bare off/no as False and on/yes as True.
        if value is None or value is False:
            return cls()
        if value is True:
            raise ConfigError(f"{where}: got a boolean (YAML reads on/yes as true); expected {TRIGGER_HELP}")
        text = str(value).strip().lower()
        act = cls._activation(activation, where)
        if text == "off":
            return cls(activation=act)
        if text == "software":
            return cls("software", "Software", act)
        if text.startswith("line") and text[4:].isdigit():
            return cls("line", f"Line{int(text[4:])}", act)
        raise ConfigError(f"{where}: {value!r} is not a trigger mode; expected {TRIGGER_HELP}")

    @staticmethod
    def _activation(value: Any, where: str) -> str:
        by_lower = {a.lower(): a for a in TRIGGER_ACTIVATIONS}
        act = by_lower.get(str(value or "RisingEdge").strip().lower())
        if act is None:
            raise ConfigError(f"{where}_activation: {value!r}, expected one of {TRIGGER_ACTIVATIONS}")
        return act

    @property
    def waits_for_parts(self) -> bool:
        return self.mode != "off"

    @property
    def label(self) -> str:
        return "off" if self.mode == "off" else str(self.source).lower()

    def node_settings(self) -> list[tuple[str, str]]:
        """SFNC nodes in the order they must be written: selector first, mode last (arms it)."""
        if self.mode == "off":
            return [("TriggerSelector", "FrameStart"), ("TriggerMode", "Off")]
        nodes = [("TriggerSelector", "FrameStart"), ("TriggerSource", str(self.source))]
        if self.mode == "line":
            nodes.append(("TriggerActivation", self.activation))
        return [*nodes, ("TriggerMode", "On")]


def apply_trigger(node_map: Any, trigger: TriggerConfig) -> tuple[list[str], dict[str, str]]:
    """Write and read back the trigger nodes; return (missing nodes, read-back values).

    With the trigger off, absent nodes are not reported: such a camera free-runs anyway.
    """
    missing: list[str] = []
    readback: dict[str, str] = {}
    for name, value in trigger.node_settings():
        if not node_map.has_node(name):
            missing.append(name)
            continue
        write_node(node_map, name, value)
        readback[name] = read_back(node_map, name, value)
    if trigger.mode == "software" and not node_map.has_node("TriggerSoftware"):
        missing.append("TriggerSoftware")
    return ([] if trigger.mode == "off" else missing), readback


@dataclass(frozen=True)
class StrobeConfig:
    """A digital output pulsed on NG: ``LineSelector=line``, ``LineSource=user_output``."""

    line: str | None = None  # Line1, Line2, ...; None: no output
    user_output: str = "UserOutput0"
    pulse_s: float = 0.05

    @classmethod
    def parse(cls, s: dict[str, Any] | None, where: str = "source.strobe") -> StrobeConfig:
        s = dict(s or {})
        line = s.get("line")
        if line in (None, "", False):
            return cls()
        text = str(line).strip()
        digits = text[4:] if text.lower().startswith("line") else text
        if not digits.isdigit():
            raise ConfigError(f"{where}.line: {line!r}, expected an output line such as Line1")
        output = str(s.get("user_output") or "UserOutput0")
        if not (output.startswith("UserOutput") and output[10:].isdigit()):
            raise ConfigError(f"{where}.user_output: {output!r}, expected UserOutput0, UserOutput1, ...")
        pulse_ms = s.get("pulse_ms", 50)
        if not isinstance(pulse_ms, int | float) or isinstance(pulse_ms, bool) or pulse_ms <= 0:
            raise ConfigError(f"{where}.pulse_ms: {pulse_ms!r}, expected a positive number of milliseconds")
        return cls(f"Line{int(digits)}", output, float(pulse_ms) / 1e3)

    @property
    def enabled(self) -> bool:
        return self.line is not None


STROBE_REQUIRED = ("LineSelector", "LineSource", "UserOutputValue")


def setup_strobe(node_map: Any, strobe: StrobeConfig) -> list[str]:
    """Route ``user_output`` to the strobe line and drive it low; return the missing nodes.

    ``LineMode`` and ``UserOutputSelector`` are optional: output-only lines and cameras
    with a single user output often lack them.
    """
    missing = [n for n in STROBE_REQUIRED if not node_map.has_node(n)]
    if missing:
        return missing
    write_node(node_map, "LineSelector", strobe.line)
    if node_map.has_node("LineMode"):
        write_node(node_map, "LineMode", "Output")
    write_node(node_map, "LineSource", strobe.user_output)
    read_back(node_map, "LineSource", strobe.user_output)
    set_user_output(node_map, strobe, False)
    return []


def set_user_output(node_map: Any, strobe: StrobeConfig, level: bool) -> None:
    if node_map.has_node("UserOutputSelector"):
        node_map.UserOutputSelector.value = strobe.user_output
    node_map.UserOutputValue.value = level


class PulseOutput:
    """Drives an output high for ``pulse_s`` after each ``fire()``; a fire during a pulse extends it.

    The writes happen on its own thread, so the caller (the inference loop) never waits
    on camera I/O; a failed write is counted and logged, never raised.
    """

    def __init__(self, write: Callable[[bool], None], pulse_s: float, name: str) -> None:
        self._write = write
        self.pulse_s = pulse_s
        self.name = name
        self.fired = 0
        self.pulses = 0  # rising edges written
        self.errors = 0
        self._off_at = 0.0
        self._pending = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def fire(self) -> None:
        with self._cv:
            if self._closed:
                return
            self.fired += 1
            self._off_at = time.monotonic() + self.pulse_s
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pouta-strobe", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self, timeout: float = 2.0) -> None:
        """End a running pulse now (output low) and stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _set(self, level: bool) -> bool:
        try:
            self._write(level)
            return True
        except Exception as exc:
            self.errors += 1
            log.warning("%s: strobe output %s failed (%s)", self.name, "high" if level else "low", exc)
            return False

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                self._pending = False
            self.pulses += int(self._set(True))
            with self._cv:
                # A fire() during the pulse moved _off_at: one longer pulse, not a glitch.
                while not self._closed and (remaining := self._off_at - time.monotonic()) > 0:
                    self._cv.wait(remaining)
                self._pending = False
            self._set(False)
