"""Run configuration: packaged defaults <- user YAML <- CLI flags, then wired into a Pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .auth import read_secret
from .backends.protocol import Backend, open_backend
from .contract.errors import ConfigError
from .contract.geometry import Roi
from .contract.metadata import Thresholds, check_request
from .contract.preprocess import preprocessor_for
from .contract.settings import Schema, resolve
from .pipeline import Pipeline
from .postprocess import PostProcessor
from .sequence import SequenceCounter
from .sinks.files import ResultWriter
from .sinks.records import ResultSink
from .sources.protocol import FrameSource
from .sources.replay import ImageFolderSource, VideoSource


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
    """Defaults <- YAML ``path`` <- ``--set`` items <- flag ``overrides`` (``pouta.edge.contract.settings``)."""
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
        from .sources.genicam import GenICamSource

        return GenICamSource.from_config(scfg)
    raise ConfigError(
        "source: none given; use --images DIR, --video FILE, --uvc N or --camera N|sim (or source.kind)"
    )


def make_backend(mcfg: dict[str, Any]) -> Backend:
    if not mcfg.get("path"):
        raise ConfigError("model.path: no model given (use --model/--engine FILE)")
    check_artifact_hash(mcfg["path"], allow_modified=bool(mcfg.get("allow_modified")))
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


def check_artifact_hash(path: str | os.PathLike[str], allow_modified: bool = False) -> None:
    """The model file must be the one its sidecar describes (``artifact_sha256``): a swapped
    file would run with another model's thresholds and id. ``allow_modified`` only warns."""
    import logging

    from .contract.errors import MetadataError
    from .contract.fsutil import sha256_file
    from .contract.metadata import load_for_model

    p = Path(path)
    if not p.is_file():
        return  # the backend reports the missing file
    want = load_for_model(p).artifact_sha256
    if not want:
        return  # older sidecars carry no hash; nothing to compare
    got = sha256_file(p)
    if got != want:
        msg = f"{p}: sha256 {got[:12]}... differs from the sidecar's artifact_sha256 {want[:12]}..."
        if not allow_modified:
            raise MetadataError(
                f"{msg}; the file was modified or swapped (--allow-modified-model to run it anyway)"
            )
        logging.getLogger("pouta.edge.config").warning("%s; running it anyway (allow_modified)", msg)


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
        verdict_timeout_s=None if pl["verdict_timeout_s"] is None else float(pl["verdict_timeout_s"]),
        close_timeout_s=float(pl["close_timeout_s"]),
        sink_queue=int(pl["sink_queue"]),
    )


def make_shadow(cfg: dict[str, Any]) -> ResultSink:
    """The candidate of ``--shadow``: opened like the live model, same ROI, its own thresholds."""
    from .sinks.shadow import ModelSlot, ShadowSink

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


def parse_umask(value: Any) -> int:
    """``"022"`` (octal digits, as for the shell's umask) -> 0o022."""
    try:
        mask = int(str(value), 8)
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise ConfigError(f"output.umask: expected octal digits such as '022', got {value!r}")
    return mask


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
        umask=parse_umask(out["umask"]),
    )
    sinks: list[ResultSink] = [files]
    mb, ua, mq = cfg["modbus"], cfg["opcua"], cfg["mqtt"]
    try:
        if mb["enabled"]:
            from .sinks.modbus import ModbusResultServer

            sinks.append(
                ModbusResultServer(
                    mb["host"],
                    int(mb["port"]),
                    handshake=bool(mb["handshake"]),
                    ack_timeout_s=float(mb["ack_timeout_s"]),
                    unit_id=mb["unit_id"],
                    allow_write=mb["allow_write"],
                    allow_read=mb["allow_read"],
                )
            )
        if ua["enabled"]:
            from .sinks.opcua import OpcUaResultServer

            sinks.append(
                OpcUaResultServer(
                    str(ua["endpoint"]),
                    handshake=bool(ua["handshake"]),
                    ack_timeout_s=float(ua["ack_timeout_s"]),
                    security=ua["security"],
                    certificate=ua["certificate"],
                    private_key=ua["private_key"],
                    pki_dir=ua["pki_dir"] or Path(out["dir"]) / "opcua-pki",
                    users_file=ua["users_file"],
                    write_role=str(ua["write_role"]),
                )
            )
        if mq["enabled"]:
            from .sinks.mqtt import MqttPublisher

            sinks.append(
                MqttPublisher(
                    str(mq["host"]),
                    int(mq["port"]),
                    topic_prefix=str(mq["topic_prefix"]),
                    client_id=mq["client_id"],
                    keepalive_s=int(mq["keepalive_s"]),
                    buffer=int(mq["buffer"]),
                    replay_s=float(mq["replay_s"]),
                    username=mq["username"],
                    password=read_secret("mqtt.password", None, mq["password_file"], mq["password_env"]),
                    tls=bool(mq["tls"]),
                    ca_file=mq["ca_file"],
                    cert_file=mq["cert_file"],
                    key_file=mq["key_file"],
                )
            )
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
