"""Stall watchdog for training: a hung run must fail loudly, never sit at 0% CPU.

If no optimizer step completes within ``timeout_s``, the watchdog dumps the Python stack
of every thread of this process and asks every child process (DataLoader workers, which
register ``faulthandler`` on SIGUSR1) to dump theirs, then ends the run with a one-line
error and a non-zero exit status. It runs in a daemon thread, so a stuck main thread
(blocked on a worker's queue, or inside a C call) does not stop it.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time

STALL_EXIT_CODE = 3


class StallWatchdog:
    """``beat(step)`` after every step; exits the process when beats stop for ``timeout_s``."""

    def __init__(self, timeout_s: float, prog: str = "pouta-train", poll_s: float = 1.0) -> None:
        self.timeout_s = float(timeout_s)
        self.prog = prog
        self.poll_s = min(float(poll_s), max(0.05, self.timeout_s / 4))
        self._last = time.monotonic()
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching (training is over: what follows, e.g. an evaluation, is no step)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat(self, step: int) -> None:
        self._step = step
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited = time.monotonic() - self._last
            if waited >= self.timeout_s:
                self._fail(waited)

    def _fail(self, waited: float) -> None:
        print(f"\n{self.prog}: stall watchdog: stacks of every thread follow", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        children = multiprocessing.active_children()
        for child in children:
            if child.pid is not None:
                print(f"{self.prog}: stack of worker process {child.pid}:", file=sys.stderr, flush=True)
                try:
                    os.kill(child.pid, signal.SIGUSR1)
                except OSError:
                    continue
                time.sleep(0.5)  # let the worker's faulthandler write before the next one
        for child in children:
            child.kill()
        print(
            f"{self.prog}: stalled: no optimizer step completed in {waited:.0f} s after step "
            f"{self._step} (limit train.stall_timeout_s={self.timeout_s:g}); stacks dumped above",
            file=sys.stderr,
            flush=True,
        )
        os._exit(STALL_EXIT_CODE)
