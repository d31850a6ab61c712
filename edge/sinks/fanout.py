"""Several sinks at once, each in its own thread, each failing on its own.

The pipeline hands every record to a ``SinkWorker`` per sink. A worker queues records
and calls its sink from its own thread, so a sink that hangs (a PLC that stops
acknowledging, a broker that is gone, a disk that stalls) delays only itself: inspection
and the other sinks go on. An exception from a sink is counted for that sink and the
record counts as not delivered there; the next record is tried as usual.

Memory stays bounded: only the newest ``image_slots`` queued records of a sink that
wants images (the files sink's NG evidence) keep their frame; older ones are reduced
to the record (``evidence_skipped``), and beyond ``max_records`` the oldest record is
dropped and counted (``dropped``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from .records import PartResult, ResultSink

log = logging.getLogger("pouta.edge.sinks.fanout")


class SinkWorker:
    def __init__(self, sink: ResultSink, max_records: int = 100000, image_slots: int = 16) -> None:
        self.sink = sink
        self.name = sink.name
        self.needs_images = sink.needs_images
        self.max_records = max(1, int(max_records))
        self.image_slots = max(0, int(image_slots))
        self._q: collections.deque[PartResult] = collections.deque()
        self._with_images: collections.deque[PartResult] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.delivered = 0
        self.failed = 0
        self.errors = 0
        self.dropped = 0
        self.evidence_skipped = 0
        self.lost_at_close = 0
        # A PLC reads a gap in the sequence as a part its reject gate never saw: records
        # must reach every sink in sequence order, and a break of that is counted here.
        self.out_of_order = 0
        self._last_seq: int | None = None
        self.write_ms: collections.deque[float] = collections.deque(maxlen=4096)
        # Capture to delivery in this sink: what a PLC or a dashboard actually waits.
        self.deliver_ms: collections.deque[float] = collections.deque(maxlen=4096)
        self._thread = threading.Thread(target=self._loop, name=f"pouta-sink-{self.name}", daemon=True)
        self._thread.start()

    def put(self, result: PartResult) -> None:
        with self._cond:
            if self._last_seq is not None and result.seq <= self._last_seq:
                self.out_of_order += 1
                log.error("sink %s: part %s came after part %s", self.name, result.seq, self._last_seq)
            self._last_seq = result.seq
            if len(self._q) >= self.max_records:
                self._q.popleft()
                self.dropped += 1
            self._q.append(result)
            if self.needs_images and result.has_image:
                self._with_images.append(result)
                while len(self._with_images) > self.image_slots:
                    old = self._with_images.popleft()
                    if old.has_image:
                        old.release_image()
                        self.evidence_skipped += 1
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._q)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    break
                result = self._q.popleft()
                if self._with_images and self._with_images[0] is result:
                    self._with_images.popleft()
            t0 = time.perf_counter()
            try:
                ok = self.sink.write(result)
            except Exception as exc:
                ok = False
                self.errors += 1
                log.exception("sink %s failed on part %s: %s", self.name, result.seq, exc)
            t1 = time.perf_counter()
            self.write_ms.append((t1 - t0) * 1e3)
            self.deliver_ms.append((t1 - result.frame.acquired) * 1e3)
            if ok:
                self.delivered += 1
            else:
                self.failed += 1
        try:
            self.sink.close()
        except Exception as exc:
            self.errors += 1
            log.exception("closing sink %s failed: %s", self.name, exc)

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued, close the sink; False if that did not finish in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Still queued (plus the one being written) when the process goes: lost, counted.
            self.lost_at_close = self.queued + 1
            return False
        return True

    def stats(self) -> dict[str, Any]:
        try:
            own = dict(self.sink.stats())
        except Exception as exc:  # a broken stats() must not break the summary
            own = {"stats_error": str(exc)}
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "exceptions": self.errors,
            "queued": self.queued,
            "dropped": self.dropped,
            "evidence_skipped": self.evidence_skipped,
            "out_of_order": self.out_of_order,
            "lost_at_close": self.lost_at_close,
            **own,
        }
