"""Frame sources: anything that yields camera-like frames, behind one small protocol.

A source's ``read`` returns the next ``Frame``, ``None`` at the end of the stream, or
raises: ``ImageReadError`` for one corrupt frame (the pipeline skips and counts it) and
``FrameTimeout`` when nothing arrived in time (counted; the source recovers by itself).
Any other exception is a bug in one frame and is counted too, never fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..contract.errors import ImageReadError, PoutaError


class FrameTimeout(PoutaError):
    """No frame arrived within the source's timeout.

    ``after_trigger``: the source knows a part was there (a trigger fired) and its frame
    never came; the pipeline then gives that part a NOT_INSPECTED record.
    """

    def __init__(self, message: str, after_trigger: bool = False) -> None:
        super().__init__(message)
        self.after_trigger = after_trigger


class SourceError(PoutaError):
    """A source cannot be opened (camera not found, file missing)."""


@dataclass
class Frame:
    """One acquired image plus what the result files need to say about it."""

    image: np.ndarray
    frame_id: int
    timestamp_ns: int  # camera timestamp when the camera has one, else wall clock
    source: str
    label: str | None = None  # OK/NG when known (replayed labelled folder)
    path: str | None = None
    color_order: str = "BGR"  # of ``image`` when it has 3/4 channels
    part_id: str | None = None  # set by a source that reads the part's id (else the PLC's is used)
    acquired: float = field(default_factory=time.perf_counter)


@runtime_checkable
class FrameSource(Protocol):
    """What the pipeline reads frames from.

    ``stop_event`` is handed over by the pipeline: a read that waits (pacing, a trigger)
    returns once it is set. ``reconnects`` and ``stats`` are the counters only the source
    can see (the pipeline counts frames, timeouts and corrupt frames itself).
    """

    name: str
    stop_event: threading.Event | None
    reconnects: int

    @property
    def stats(self) -> dict[str, Any]: ...

    def open(self) -> None: ...

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


class SourceBase:
    """The members of ``FrameSource`` that a source which cannot reconnect shares."""

    name = "source"

    def __init__(self) -> None:
        self.stop_event: threading.Event | None = None
        self.reconnects = 0

    @property
    def stats(self) -> dict[str, Any]:
        return {}


def signal_verdict(source: object, ng: bool) -> None:
    """Hand a part's verdict to a source that drives an output (GenICam NG strobe); others ignore it.

    Sources implementing ``signal_verdict`` return at once and never raise.
    """
    signal = getattr(source, "signal_verdict", None)
    if signal is not None:
        signal(ng)


def iterate(source: FrameSource) -> Iterator[Frame]:
    """Frames of a finite source, skipping corrupt ones (for small tools and tests)."""
    while True:
        try:
            frame = source.read()
        except ImageReadError:
            continue
        if frame is None:
            return
        yield frame
