"""A part sequence number that only ever grows, across restarts, and never repeats.

Writing the counter file for every part would cost an fsync per part, so while running
the file holds the end of a reserved block (the first number *not yet* reserved, with
``"clean": false``). A clean shutdown (``close``) writes the next number itself with
``"clean": true``, so the next run continues without a gap. After a crash the file still
says ``"clean": false``: the run continues after the reserved block, and the first
number it hands out is flagged (``take_gap`` -> ``"crash"``) so the record says where
the gap came from.

If the file cannot be written when a new block is due (disk full), no number is handed
out (``SequenceError``): a number the file does not cover could be handed out again
after a restart. The pipeline raises its fault instead; every later call retries.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from .contract.errors import ConfigError, PoutaError
from .contract.fsutil import atomic_write_json

log = logging.getLogger("pouta.edge.sequence")


class SequenceError(PoutaError):
    """No number can be handed out without the risk of repeating one."""


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
        self._gap: str | None = None
        self._closed = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._next = self._reserved = int(data["next"])
                clean = bool(data.get("clean", False))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Restarting at 1 would repeat numbers the PLC and the archive already hold.
                raise ConfigError(
                    f'{self.path}: unreadable sequence counter ({exc}); expected {{"next": N}} '
                    "— fix or delete it deliberately"
                ) from None
            if not clean:
                self._gap = "crash"
                log.warning(
                    "%s: the last run did not stop cleanly; numbering continues at %d "
                    "(numbers it reserved but did not use are a gap)",
                    self.path,
                    self._next,
                )

    @property
    def peek(self) -> int:
        """The number the next part will get."""
        return self._next

    def take_gap(self) -> str | None:
        """Why the sequence jumps before the number just handed out (``"crash"``), once."""
        gap, self._gap = self._gap, None
        return gap

    def _reserve(self) -> None:
        target = self._next + self.block
        if self.path is None:
            self._reserved = target
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"next": target, "clean": False})
        except OSError as exc:
            self.persist_errors += 1
            if not self._reported:
                self._reported = True
                log.error(
                    "%s: cannot save the sequence counter (%s); no numbers until it can", self.path, exc
                )
            raise SequenceError(
                f"{self.path}: cannot save the sequence counter ({exc.strerror or exc}); "
                "parts are not numbered until it can be written"
            ) from None
        self._reserved = target
        self._reported = False

    def next(self) -> int:
        with self._lock:
            if self._next >= self._reserved:
                self._reserve()
            n = self._next
            self._next += 1
            return n

    def close(self) -> bool:
        """Clean shutdown: save the next number itself, so the next run has no gap.

        False if that could not be written: the file then keeps the reserved block's end,
        which is still never repeated (the next run reports a crash gap)."""
        with self._lock:
            if self._closed or self.path is None:
                return True
            self._closed = True
            # No number handed out since a crash: the file must keep saying so.
            clean = self._gap is None
            try:
                atomic_write_json(self.path, {"next": self._next, "clean": clean})
            except OSError as exc:
                log.error("%s: cannot save the sequence counter at shutdown (%s)", self.path, exc)
                return False
            return True
