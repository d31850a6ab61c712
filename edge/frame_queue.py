"""The queue between acquisition and inference, with the full-queue policy."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .contract.errors import ConfigError
from .sources.protocol import Frame
from .stats import Stats

POLICIES = ("drop-oldest", "block")
END = object()  # end-of-stream marker passed down the queues


@dataclass
class PendingPart:
    """A part on its way through the pipeline: numbered at acquisition."""

    seq: int
    part_id: str | None
    frame: Frame | None  # None: nothing usable was acquired (corrupt frame, trigger timeout)
    reason: str | None = None
    wall_time: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)  # acquisition, for the verdict watchdog
    gap: str | None = None  # why the sequence jumps before this part ("crash")


class FrameQueue:
    """Bounded queue with a full-queue policy; counts what it drops and hands each
    dropped item to ``on_drop`` (it still needs its NOT_INSPECTED record)."""

    def __init__(
        self, maxsize: int, policy: str, stats: Stats, on_drop: Callable[[Any], None] | None = None
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"pipeline.policy: expected one of {POLICIES}, got {policy!r}")
        if maxsize < 1:
            raise ConfigError(f"pipeline.queue_size: expected >= 1, got {maxsize}")
        self.q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.policy = policy
        self.stats = stats
        self.on_drop = on_drop
        # Taking the oldest item out and handing it to on_drop is one step under this
        # lock; see settle().
        self._drop_lock = threading.Lock()

    def _dropped(self, item: Any) -> None:
        self.stats.add(dropped=1)
        if self.on_drop is not None:
            self.on_drop(item)

    def put(self, item: Any, stop: threading.Event) -> None:
        if item is END or self.policy == "block":
            while True:
                try:
                    self.q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    # The end marker must get through even after stop(); frames need not.
                    if stop.is_set() and item is not END:
                        self._dropped(item)
                        return
        while True:
            try:
                self.q.put_nowait(item)
                return
            except queue.Full:
                with self._drop_lock, contextlib.suppress(queue.Empty):
                    self._dropped(self.q.get_nowait())

    def get(self, timeout: float | None = None) -> Any:
        return self.q.get(timeout=timeout)

    def settle(self) -> None:
        """Return once a drop in progress has reached on_drop. Called after get(): an item
        dropped ahead of the one just got left the queue before it, so after this it is
        in on_drop's hands and its record can go out first (sequence order)."""
        with self._drop_lock:
            pass

    def empty(self) -> bool:
        return self.q.empty()

    def get_nowait(self) -> Any:
        return self.q.get_nowait()

    def wait_item(self, timeout: float) -> None:
        """Return when the queue holds an item or ``timeout`` passed (the item stays queued)."""
        with self.q.not_empty:
            if not self.q._qsize():
                self.q.not_empty.wait(timeout)

    def oldest(self) -> Any:
        """The item that would be got next, or None; it stays queued."""
        with self.q.mutex:
            return self.q.queue[0] if self.q.queue else None

    def drain(self) -> list[Any]:
        """Take every queued item out (END is put back: the consumer must still see it)."""
        out: list[Any] = []
        end = False
        with self._drop_lock:
            while True:
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
                if item is END:
                    end = True
                else:
                    out.append(item)
        if end:
            self.q.put(END)
        return out
