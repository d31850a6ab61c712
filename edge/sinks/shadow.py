"""Shadow mode: a candidate model judges every part beside the live one, and never decides.

The candidate runs as one more sink: it takes a reference to the frame in the write thread
(``peek``, after the live verdict exists) and scores it in its own sink thread, so it cannot
delay the live verdict or what the PLC reads. Each compared part goes to
``shadow/shadow.csv``; each disagreement also leaves its frame and both records in
``shadow/disagreements/``; ``shadow/summary.json`` holds the counts and the candidate's score
distribution. ``promote`` swaps the two models between two parts (the pipeline applies the
swap before it judges the next part), and the old live model becomes the shadow, so a
rollback is the same action.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..backends.protocol import Backend
from ..contract.errors import ConfigError
from ..contract.fsutil import atomic_write_json
from ..contract.preprocess import Preprocessor
from ..postprocess import PostProcessor
from .records import PartResult, normalised_score, utc_iso

log = logging.getLogger("pouta.edge.sinks.shadow")

CSV_HEADER = (
    "seq,path,frame_id,live_model_id,live_verdict,live_score,live_threshold,"
    "shadow_model_id,shadow_verdict,shadow_score,shadow_threshold,agree\n"
)
# Score-ratio bins (score / own threshold) of the candidate's distribution: 1.0 = its threshold.
RATIO_EDGES = (0.0, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, float("inf"))


@dataclass
class ModelSlot:
    """One model as the pipeline runs it: its own preprocessing, backend and thresholds."""

    pre: Preprocessor
    backend: Backend
    post: PostProcessor

    @property
    def model_id(self) -> str:
        return self.backend.metadata.model_id


class ShadowSink:
    name = "shadow"
    needs_images = False  # frames are taken in ``peek``; the record queue stays pixel-free

    def __init__(self, candidate: ModelSlot, out_dir: str | Path, max_pending: int = 64) -> None:
        self.slot = candidate
        self.dir = Path(out_dir)
        self.disagree_dir = self.dir / "disagreements"
        self.disagree_dir.mkdir(parents=True, exist_ok=True)
        self.max_pending = max(1, int(max_pending))
        self._frames: collections.OrderedDict[int, tuple[np.ndarray, str]] = collections.OrderedDict()
        self._peek_lock = threading.Lock()
        # Held while the candidate scores a part and while a promotion exchanges the models,
        # so a backend is never run by both threads at once.
        self._model_lock = threading.Lock()
        self.compared = self.agree = self.live_ok_shadow_ng = self.live_ng_shadow_ok = 0
        self.skipped = self.errors = self.promotions = 0
        self.ratios: collections.Counter[int] = collections.Counter()
        self.scores: collections.deque[float] = collections.deque(maxlen=4096)
        self._csv = (self.dir / "shadow.csv").open("a", encoding="utf-8")
        if self._csv.tell() == 0:
            self._csv.write(CSV_HEADER)

    # -- write thread: after the live verdict, before the record is queued -----
    def peek(self, result: PartResult) -> None:
        """Keep a reference to the judged frame; return at once, never raise."""
        try:
            if result.verdict is None or not result.has_image:
                return
            with self._peek_lock:
                self._frames[result.seq] = (result.frame.image, result.frame.color_order)
                while len(self._frames) > self.max_pending:
                    self._frames.popitem(last=False)  # counted as skipped when its record comes
        except Exception as exc:  # the live line must not notice the shadow
            log.error("shadow: could not keep part %s: %s", result.seq, exc)

    # -- the shadow's own sink thread --------------------------------------
    def write(self, result: PartResult) -> bool:
        if result.verdict is None:
            return True  # not inspected by the live model: nothing to compare
        with self._peek_lock:
            frame = self._frames.pop(result.seq, None)
        if frame is None:
            self.skipped += 1  # the candidate fell behind the line; the live record is unaffected
            return True
        image, color_order = frame
        with self._model_lock:
            slot = self.slot
            try:
                x, geometry = slot.pre.tiles(image, color_order)
                amap, score = slot.backend.run(x)
                verdict = slot.post(amap, score, geometry)
            except Exception as exc:
                self.errors += 1
                log.error("shadow: %s could not judge part %s: %s", slot.model_id, result.seq, exc)
                return False
        live = result.verdict
        agree = live.verdict == verdict.verdict
        self.compared += 1
        self.agree += int(agree)
        if not agree:
            if live.is_ng:
                self.live_ng_shadow_ok += 1
            else:
                self.live_ok_shadow_ng += 1
        ratio = normalised_score(verdict.score, verdict.threshold)
        if np.isfinite(ratio):
            self.scores.append(float(verdict.score))
            self.ratios[int(np.searchsorted(RATIO_EDGES, ratio, side="right")) - 1] += 1
        d = result.to_dict()
        row = [
            d["seq"],
            d["path"] or "",
            d["frame_id"],
            result.model_id,
            live.verdict,
            f"{live.score:.6g}",
            f"{live.threshold:.6g}",
            slot.model_id,
            verdict.verdict,
            f"{verdict.score:.6g}",
            f"{verdict.threshold:.6g}",
            int(agree),
        ]
        self._csv.write(",".join(str(v).replace(",", ";") for v in row) + "\n")
        self._csv.flush()
        if not agree:
            self._keep_disagreement(result, image, slot.model_id, verdict.to_dict())
        return True

    def _keep_disagreement(
        self, result: PartResult, image: np.ndarray, shadow_id: str, shadow: dict[str, Any]
    ) -> None:
        assert result.verdict is not None
        stem = f"{result.seq:010d}_live-{result.verdict.verdict}_shadow-{shadow['verdict']}"
        ok, png = cv2.imencode(".png", image)
        if ok:
            (self.disagree_dir / f"{stem}.png").write_bytes(png.tobytes())
        atomic_write_json(
            self.disagree_dir / f"{stem}.json",
            {"live": result.to_dict(), "shadow": {**shadow, "model_id": shadow_id}},
            fsync=False,
        )

    # -- promotion -----------------------------------------------------------
    def exchange(self, live: ModelSlot) -> ModelSlot:
        """Give the candidate to the line and shadow the old live model (the pipeline calls
        this between two parts, from its inference thread)."""
        with self._model_lock:
            candidate, self.slot = self.slot, live
            self.promotions += 1
        return candidate

    # -- reporting -------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s = np.asarray(self.scores, dtype=np.float64)
        labels = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(RATIO_EDGES)]
        q = np.quantile(s, [0.5, 0.9, 0.99, 1.0]).round(6).tolist() if s.size else []
        return {
            "shadow_model_id": self.slot.model_id,
            "compared": self.compared,
            "agree": self.agree,
            "disagree": self.compared - self.agree,
            "live_ok_shadow_ng": self.live_ok_shadow_ng,
            "live_ng_shadow_ok": self.live_ng_shadow_ok,
            "skipped": self.skipped,
            "errors": self.errors,
            "promotions": self.promotions,
            "score_quantiles": dict(zip(("p50", "p90", "p99", "max"), q, strict=False)),
            "score_over_threshold_hist": {labels[i]: self.ratios.get(i, 0) for i in range(len(labels))},
            "time": utc_iso(time.time()),
        }

    def stats(self) -> dict[str, Any]:
        return self.summary()

    def close(self) -> None:
        try:
            atomic_write_json(self.dir / "summary.json", self.summary(), fsync=False)
        finally:
            self._csv.close()
            self.slot.backend.close()


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"shadow {s['shadow_model_id']}: compared {s['compared']}  agree {s['agree']}  disagree "
        f"{s['disagree']} (live OK / shadow NG {s['live_ok_shadow_ng']}, live NG / shadow OK "
        f"{s['live_ng_shadow_ok']})  skipped {s['skipped']}  errors {s['errors']}"
    )


def metric_families(s: dict[str, Any]) -> list[Any]:
    """Prometheus families of the shadow's summary (``/metrics`` beside the pipeline's)."""
    from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

    parts = CounterMetricFamily(
        "pouta_shadow_parts",
        "Parts the shadow model saw, by outcome against the live verdict",
        labels=["outcome"],
    )
    for key in ("agree", "live_ok_shadow_ng", "live_ng_shadow_ok", "skipped", "errors"):
        parts.add_metric([key], float(s.get(key, 0)))
    ratio = CounterMetricFamily(
        "pouta_shadow_score_over_threshold",
        "Shadow model scores by score / its own threshold (1 = its threshold)",
        labels=["bin"],
    )
    for label, n in s.get("score_over_threshold_hist", {}).items():
        ratio.add_metric([label], float(n))
    info = InfoMetricFamily("pouta_shadow_model", "The shadow (candidate) model")
    info.add_metric([], {"model_id": str(s.get("shadow_model_id", ""))})
    return [parts, ratio, info]


def find_shadow(sinks: list[Any]) -> ShadowSink | None:
    return next((s for s in sinks if isinstance(s, ShadowSink)), None)


def promote(pipe: Any) -> tuple[bool, str]:
    """Ask a running pipeline to swap in its shadow model before the next part: (done, one line)."""
    shadow = find_shadow(pipe.sinks)
    if shadow is None:
        return (
            False,
            "pouta-edge: promote refused: this run has no shadow model (start it with --shadow FILE)",
        )
    pipe.request_swap(shadow.exchange)
    return True, (
        f"pouta-edge: promoting {shadow.slot.model_id} (live {pipe.model_id} becomes the shadow) before the next part"
    )


def signal_promote(pid: int) -> str:
    """``pouta-edge promote --pid N``: SIGUSR1 to the run, which promotes between two parts."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is None:
        raise ConfigError("promote: this platform has no SIGUSR1")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise ConfigError(f"promote --pid {pid}: no such process") from None
    except PermissionError:
        raise ConfigError(
            f"promote --pid {pid}: not allowed to signal that process (run as its user)"
        ) from None
    return f"asked process {pid} to promote its shadow model (the run logs the model change)"
