"""Run configuration: packaged defaults <- user YAML <- CLI flags, then wired into a Pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .backend import Backend, open_backend
from .errors import ConfigError
from .geometry import Roi
from .metadata import Thresholds, check_request
from .pipeline import Pipeline
from .postprocess import PostProcessor
from .preprocess import preprocessor_for
from .records import ResultSink
from .sequence import SequenceCounter
from .settings import Schema, resolve
from .sinks import ResultWriter
from .sources import FrameSource, ImageFolderSource, VideoSource


def default_config() -> dict[str, Any]:
    text = resources.files("pouta.edge").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def run_schema() -> Schema:
    """``pouta-edge run``'s settings: the packaged defaults are the schema."""
    return Schema(default_config(), free_form=frozenset({"source.nodes"}))


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: dict[str, Any] | None = None,
    sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Defaults <- YAML ``path`` <- ``--set`` items <- flag ``overrides`` (``pouta.edge.settings``)."""
    return resolve(run_schema(), path, sets, overrides)


def make_source(scfg: dict[str, Any]) -> FrameSource:
    kind = scfg.get("kind")
    if kind == "images":
        return ImageFolderSource(
            scfg["path"], fps=scfg["fps"], loop=bool(scfg["loop"]), labels=scfg["labels"]
        )
    if kind == "video":
        return VideoSource(str(scfg["path"]), fps=scfg["fps"], loop=bool(scfg["loop"]))
    if kind == "uvc":
        return VideoSource(int(scfg["camera"] or 0))
    if kind == "genicam":
        from .genicam import GenICamSource

        return GenICamSource.from_config(scfg)
    raise ConfigError(
        "source: none given; use --images DIR, --video FILE, --uvc N or --camera N|sim (or source.kind)"
    )


def make_backend(mcfg: dict[str, Any]) -> Backend:
    if not mcfg.get("path"):
        raise ConfigError("model.path: no model given (use --model/--engine FILE)")
    backend = open_backend(
        mcfg["path"],
        providers=mcfg.get("providers"),
        threads=mcfg.get("threads"),
        spin=bool(mcfg.get("spin", True)),
    )
    try:
        check_request(
            backend.metadata,
            str(mcfg["path"]),
            model_kind=mcfg.get("expect_kind"),
            precision=mcfg.get("expect_precision"),
        )
    except Exception:
        backend.close()
        raise
    return backend


def build_pipeline(cfg: dict[str, Any], source: FrameSource | None = None) -> Pipeline:
    """The pipeline for a merged config; it owns (and closes) source, backend and sinks.

    Built source first, then backend, then sinks: whatever fails closes what was built.
    """
    built: list[Any] = []
    try:
        src = source if source is not None else make_source(cfg["source"])
        built.append(src)
        backend = make_backend(cfg["model"])
        built.append(backend)
        meta = backend.metadata
        pc = cfg["preprocess"]
        pre = preprocessor_for(meta, roi=Roi.parse(pc["roi"]), interpolation=pc["interpolation"])
        post = make_postprocessor(cfg, meta.thresholds)
        sinks = make_sinks(cfg)
        built.extend(sinks)
        if cfg["shadow"]["path"]:
            sinks.append(make_shadow(cfg))
    except BaseException:
        for part in reversed(built):
            part.close()
        raise
    pl = cfg["pipeline"]
    policy = pl["policy"]
    sc = cfg["source"]
    if source is None and sc["kind"] in ("images", "video") and not sc["fps"]:
        # A file replayed as fast as inference takes it has no line rate to keep up with.
        policy = "block"
    seq_file = pl["sequence_file"] or Path(cfg["output"]["dir"]) / "sequence.json"
    return Pipeline(
        src,
        pre,
        backend,
        post,
        sinks,
        queue_size=int(pl["queue_size"]),
        policy=policy,
        max_frames=pl["max_frames"],
        duration=pl["duration"],
        sequence=SequenceCounter(seq_file),
        not_inspected_is_ng=bool(pl["not_inspected_is_ng"]),
        heartbeat_s=float(pl["heartbeat_s"] or 0),
    )


def make_shadow(cfg: dict[str, Any]) -> ResultSink:
    """The candidate of ``--shadow``: opened like the live model, same ROI, its own thresholds."""
    from .shadow import ModelSlot, ShadowSink

    backend = make_backend({**cfg["model"], "path": cfg["shadow"]["path"]})
    try:
        meta = backend.metadata
        pc, oc = cfg["preprocess"], cfg["postprocess"]
        pre = preprocessor_for(meta, roi=Roi.parse(pc["roi"]), interpolation=pc["interpolation"])
        post = make_postprocessor(
            {**cfg, "postprocess": {**oc, "image_threshold": None, "pixel_threshold": None}}, meta.thresholds
        )
        return ShadowSink(
            ModelSlot(pre, backend, post),
            Path(cfg["output"]["dir"]) / "shadow",
            max_pending=int(cfg["shadow"]["max_pending"]),
        )
    except BaseException:
        backend.close()
        raise


def make_postprocessor(cfg: dict[str, Any], thresholds: Thresholds | None) -> PostProcessor:
    """Config overrides beat the model's calibrated thresholds (also used by the hot reload)."""
    oc = cfg["postprocess"]
    return PostProcessor(
        thresholds,
        min_area=oc["min_area"],
        max_regions=oc["max_regions"],
        image_threshold=oc["image_threshold"],
        pixel_threshold=oc["pixel_threshold"],
        border_margin=oc["border_margin"],
    )


def make_sinks(cfg: dict[str, Any]) -> list[ResultSink]:
    """The files (always) plus each enabled network sink; their libraries import only when enabled."""
    out = cfg["output"]
    files = ResultWriter(
        out["dir"],
        json_files=out["json"],
        csv=out["csv"],
        latest=out["latest"],
        overlays=out["overlays"],
        overlay_format=out["overlay_format"],
        keep_files=out["keep_files"],
        keep_mb=out["keep_mb"],
        csv_max_mb=out["csv_max_mb"],
        csv_keep=out["csv_keep"],
        fsync=out["fsync"],
        backlog=out["backlog"],
        raw_ng=out["raw_ng"],
        ng_keep_files=out["ng_keep_files"],
        ng_keep_mb=out["ng_keep_mb"],
    )
    sinks: list[ResultSink] = [files]
    mb, ua, mq = cfg["modbus"], cfg["opcua"], cfg["mqtt"]
    try:
        if mb["enabled"]:
            from .modbus_server import ModbusResultServer

            sinks.append(
                ModbusResultServer(
                    mb["host"],
                    int(mb["port"]),
                    handshake=bool(mb["handshake"]),
                    ack_timeout_s=float(mb["ack_timeout_s"]),
                )
            )
        if ua["enabled"]:
            from .opcua_server import OpcUaResultServer

            sinks.append(
                OpcUaResultServer(
                    str(ua["endpoint"]),
                    handshake=bool(ua["handshake"]),
                    ack_timeout_s=float(ua["ack_timeout_s"]),
                )
            )
        if mq["enabled"]:
            from .mqtt_publisher import MqttPublisher

            sinks.append(
                MqttPublisher(
                    str(mq["host"]),
                    int(mq["port"]),
                    topic_prefix=str(mq["topic_prefix"]),
                    client_id=mq["client_id"],
                    keepalive_s=int(mq["keepalive_s"]),
                    buffer=int(mq["buffer"]),
                    replay_s=float(mq["replay_s"]),
                )
            )
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
