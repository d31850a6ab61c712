"""Run configuration: packaged defaults <- user YAML <- CLI flags, then wired into a Pipeline."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .backend import Backend, open_backend
from .errors import ConfigError
from .metadata import Thresholds, check_request
from .pipeline import Pipeline
from .postprocess import PostProcessor
from .preprocess import Roi, preprocessor_for
from .sequence import SequenceCounter
from .sinks import ResultSink, ResultWriter
from .sources import FrameSource, ImageFolderSource, VideoSource


def default_config() -> dict[str, Any]:
    text = resources.files("pouta.edge").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep merge; an unknown key is an error naming it (typos must not be silently ignored)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"config: unknown key '{path}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and key != "nodes":
            if not isinstance(value, dict):
                raise ConfigError(f"config: '{path}' must be a mapping, got {type(value).__name__}")
            out[key] = merge(base[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    cfg = default_config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        cfg = merge(cfg, user)
    if overrides:
        cfg = merge(cfg, overrides)
    return cfg


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
    backend = make_backend(cfg["model"])
    meta = backend.metadata
    pc = cfg["preprocess"]
    pre = preprocessor_for(meta, roi=Roi.parse(pc["roi"]), interpolation=pc["interpolation"])
    post = make_postprocessor(cfg, meta.thresholds)
    sinks = make_sinks(cfg)
    pl = cfg["pipeline"]
    policy = pl["policy"]
    sc = cfg["source"]
    if source is None and sc.get("kind") in ("images", "video") and not sc.get("fps"):
        # A file replayed as fast as inference takes it has no line rate to keep up with.
        policy = "block"
    seq_file = pl["sequence_file"] or Path(cfg["output"]["dir"]) / "sequence.json"
    return Pipeline(
        source if source is not None else make_source(cfg["source"]),
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
