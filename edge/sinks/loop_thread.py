"""An asyncio server on its own thread, so the network side never runs on an inspection thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any


def start_loop_thread(
    loop: asyncio.AbstractEventLoop,
    start: Callable[[], Coroutine[Any, Any, Any]],
    name: str,
    timeout_s: float,
) -> tuple[threading.Thread, BaseException | None]:
    """Run ``start()`` on ``loop`` in a new daemon thread, then keep serving there.

    Returns the thread and what went wrong starting: the exception ``start`` raised, a
    ``TimeoutError`` when it did not finish within ``timeout_s``, or None.
    """
    started = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:
            error.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not started.wait(timeout_s):
        return thread, TimeoutError(f"not started within {timeout_s:g} s")
    return thread, error[0] if error else None
