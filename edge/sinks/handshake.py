"""The result handshake a PLC can hold inspection results with (Modbus and OPC UA alike).

One result is presented at a time, flagged valid; the PLC acknowledges it by its
sequence number; only then is the next result presented. A PLC that does not answer
within ``ack_timeout_s`` does not stop the line: the next result is presented anyway and
the timeout is counted.
"""

from __future__ import annotations

import threading
import time

from ..postprocess import NG, NOT_INSPECTED, OK


class ResultHandshake:
    """Handshake state shared by the PLC-facing sinks; ``_cond`` also guards their own state."""

    def __init__(self, handshake: bool, ack_timeout_s: float) -> None:
        self.handshake = handshake
        self.ack_timeout_s = float(ack_timeout_s)
        self._cond = threading.Condition()
        self._valid = False
        self._closing = False
        self.acks = 0
        self.ack_timeouts = 0
        self._counts = {OK: 0, NG: 0, NOT_INSPECTED: 0}

    def _await_ack(self) -> None:
        """With ``_cond`` held, before presenting a result: wait for the previous one's ack."""
        if not (self.handshake and self._valid):
            return
        deadline = time.monotonic() + self.ack_timeout_s
        while self._valid and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                self.ack_timeouts += 1
                return
            self._cond.wait(left)

    def _acknowledged(self) -> None:
        """With ``_cond`` held: the PLC acknowledged the presented result."""
        self._valid = False
        self.acks += 1
        self._cond.notify_all()

    def _drain(self) -> None:
        """With ``_cond`` held, at close: the last result deserves its ack too."""
        if self.handshake:
            end = time.monotonic() + self.ack_timeout_s
            while self._valid and time.monotonic() < end:
                self._cond.wait(max(0.0, end - time.monotonic()))
        self._closing = True
        self._cond.notify_all()
