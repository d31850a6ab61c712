"""A part sequence number that only ever grows, across restarts.

Writing the counter file for every part would cost an fsync per part, so numbers are
reserved in blocks: the file holds the first number *not yet* reserved, and a restart
continues from there. A crash skips at most one block of numbers; it never repeats one.
If the file cannot be written (disk full), numbering continues in memory, the failure
is reported once, and every following number retries the reservation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from .errors import ConfigError
from .fsutil import atomic_write_json

log = logging.getLogger("pouta.edge.sequence")


class SequenceCounter:
    def __init__(self, path: str | os.PathLike[str] | None, block: int = 1000, start: int = 1) -> None:
        if block < 1:
            raise ConfigError(f"sequence block: expected >= 1, got {block}")
        self.path = Path(path) if path is not None else None
        self.block = int(block)
        self._lock = threading.Lock()
        self._next = int(start)
        self._reserved = self._next  # numbers below this are safe to hand out
        self.persist_errors = 0
        self._reported = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._next = self._reserved = int(data["next"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Restarting at 1 would repeat numbers the PLC and the archive already hold.
                raise ConfigError(
                    f'{self.path}: unreadable sequence counter ({exc}); expected {{"next": N}} '
                    "— fix or delete it deliberately"
                ) from None

    @property
    def peek(self) -> int:
        """The number the next part will get."""
        return self._next

    def _reserve(self) -> None:
        if self.path is None:
            self._reserved = self._next + self.block
            return
        target = self._next + self.block
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"next": target})
        except OSError as exc:
            self.persist_errors += 1
            if not self._reported:
                self._reported = True
                log.error(
                    "%s: cannot save the sequence counter (%s); numbering continues in memory", self.path, exc
                )
            return
        self._reserved = target
        self._reported = False

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            n = self._next
            self._next += 1
            return n
