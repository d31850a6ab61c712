"""Prometheus metrics for the plant's monitoring (``/metrics``; pip install 'pouta-edge[ui]').

Two halves. ``MetricsSink`` is a result sink like the files or the PLC (its own thread
and queue in the fan-out): per record it counts the verdict, the reason a part was not
inspected, observes the per-stage latencies and the normalised score, and feeds the
score drift. ``PipelineCollector`` reads the pipeline's own counters at scrape time
(drops, corrupt frames, reconnects, write errors, backlog, sink queues), so nothing is
counted twice and a scrape costs inspection nothing.

Every metric lives in the sink's own ``CollectorRegistry`` (not the process-global
one): two pipelines in one process never collide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..drift import ScoreDrift
from ..postprocess import OK
from ..sinks.records import NOT_INSPECTED, REASONS, VERDICTS, PartResult

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Normalised score: 1.0 is the threshold; fine steps around it, where drift shows first.
SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        from ..contract.errors import ConfigError

        raise ConfigError(
            f"http: /metrics needs prometheus-client ({exc}); pip install 'pouta-edge[ui]'"
        ) from None
    return prometheus_client


class MetricsSink:
    """Result sink that turns records into Prometheus counters, histograms and the drift gauge."""

    name = "metrics"
    needs_images = False

    def __init__(self, drift: ScoreDrift, summary: Callable[[], dict[str, Any]] | None = None) -> None:
        pc = _prometheus()
        self.registry: CollectorRegistry = pc.CollectorRegistry(auto_describe=True)
        self.drift = drift
        r = self.registry
        self.parts = pc.Counter(
            "pouta_parts", "Parts by verdict (OK, NG, NOT_INSPECTED)", ["verdict"], registry=r
        )
        self.not_inspected = pc.Counter(
            "pouta_not_inspected", "Parts not inspected, by reason", ["reason"], registry=r
        )
        self.rejects = pc.Counter("pouta_rejects", "Parts the reject gate had to reject", registry=r)
        self.latency = pc.Histogram(
            "pouta_stage_latency_seconds",
            "Per-stage latency of inspected parts (queue, preprocess, infer, postprocess, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.score = pc.Histogram(
            "pouta_score_normalised",
            "Normalised score of inspected parts (score / threshold; NG above 1)",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.drift_ratio = pc.Gauge(
            "pouta_score_drift_ratio",
            "Rolling median of OK parts' scores / calibration median (NaN: no reference yet)",
            registry=r,
        )
        self.drift_ratio.set_function(lambda: _nan(self.drift.ratio()))
        self.drift_warning = pc.Gauge(
            "pouta_score_drift_warning", "1 while the drift ratio is past the warning ratio", registry=r
        )
        self.drift_warning.set_function(lambda: float(self.drift.ratio() is not None and self.drift.warning))
        pc.Gauge(
            "pouta_score_drift_warn_ratio", "Drift ratio above which a warning is raised", registry=r
        ).set_function(lambda: self.drift.warn_ratio)
        # Every label exists from the start: a dashboard shows 0, not "no data".
        for v in VERDICTS:
            self.parts.labels(v)
        for reason in REASONS:
            self.not_inspected.labels(reason)
        if summary is not None:
            r.register(PipelineCollector(summary))

    def write(self, result: PartResult) -> bool:
        d = result.to_dict()
        self.parts.labels(d["verdict"]).inc()
        if d["reject"]:
            self.rejects.inc()
        if d["verdict"] == NOT_INSPECTED:
            self.not_inspected.labels(d["reason"] or "unknown").inc()
            return True
        for stage, ms in d["latency_ms"].items():
            self.latency.labels(stage).observe(ms / 1e3)
        if d["score_norm"] is not None:
            self.score.observe(d["score_norm"])
        if d["verdict"] == OK and d["score"] is not None:
            self.drift.add(d["score"])
        return True

    def exposition(self) -> bytes:
        return bytes(_prometheus().generate_latest(self.registry))

    def stats(self) -> dict[str, Any]:
        return {"drift_ratio": self.drift.snapshot().get("ratio")}

    def close(self) -> None:
        pass


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


class PipelineCollector:
    """The pipeline's counters, read when Prometheus scrapes."""

    def __init__(self, summary: Callable[[], dict[str, Any]]) -> None:
        self.summary = summary

    def describe(self) -> list[Any]:
        return []  # collected lazily: no pipeline call at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        s = self.summary()
        for key, name, doc in (
            ("acquired", "pouta_frames_acquired", "Frames acquired from the source"),
            ("dropped", "pouta_frames_dropped", "Frames dropped because inference was behind"),
            ("corrupt", "pouta_frames_corrupt", "Corrupt frames"),
            ("timeouts", "pouta_camera_timeouts", "Frame fetch timeouts"),
            ("reconnects", "pouta_camera_reconnects", "Camera reconnects"),
            ("frame_errors", "pouta_frame_errors", "Frames that failed in acquisition or inference"),
            ("write_errors", "pouta_write_errors", "Result write errors over all sinks"),
            ("backlog_dropped", "pouta_backlog_dropped", "Records dropped from the full disk backlog"),
        ):
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(
            "pouta_fault",
            "1 while the runtime is in its fault state (parts recorded NOT_INSPECTED, ready off)",
            value=float(bool(s.get("fault"))),
        )
        for key, name, doc in (
            ("faults", "pouta_faults", "Times the fault state was raised"),
            ("verdict_timeouts", "pouta_verdict_timeouts", "Parts recorded NOT_INSPECTED by the watchdog"),
            ("non_finite", "pouta_non_finite_outputs", "Parts whose model output was NaN/inf"),
            (
                "records_lost",
                "pouta_records_lost",
                "Records that never reached a sink (queues, backlog, exit)",
            ),
            ("part_id_rejected", "pouta_part_id_rejected", "Part ids refused (too long, not printable)"),
            (
                "unnumbered",
                "pouta_unnumbered_parts",
                "Parts seen while the sequence counter could not be saved",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(
            "pouta_backlog_records",
            "Records waiting for the disk",
            value=float(s.get("unsaved_in_memory", 0)),
        )
        yield GaugeMetricFamily(
            "pouta_fps", "Inspected parts per second (recent)", value=float(s.get("fps", 0))
        )
        queued = GaugeMetricFamily("pouta_sink_queue_records", "Records queued per sink", labels=["sink"])
        dropped = CounterMetricFamily(
            "pouta_sink_dropped", "Records a sink's full queue dropped", labels=["sink"]
        )
        failed = CounterMetricFamily("pouta_sink_failed", "Records a sink could not deliver", labels=["sink"])
        for sink, st in s.get("sinks", {}).items():
            queued.add_metric([sink], float(st.get("queued", 0)))
            dropped.add_metric([sink], float(st.get("dropped", 0)))
            failed.add_metric([sink], float(st.get("failed", 0)))
        yield from (queued, dropped, failed)
        shadow = s.get("sinks", {}).get("shadow")
        if shadow is not None:
            from ..sinks.shadow import metric_families

            yield from metric_families(shadow)
        feedback = s.get("sinks", {}).get("feedback")
        if feedback is not None:
            from .feedback import metric_families as feedback_families

            yield from feedback_families(feedback)
        info = InfoMetricFamily("pouta_model", "The model being run")
        info.add_metric([], {"model_id": str(s.get("model_id", "")), "backend": str(s.get("backend", ""))})
        yield info
