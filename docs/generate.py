"""Generated documentation: the configuration reference, the install extras, the results.

An MkDocs hook (``hooks:`` in mkdocs.yml): a page line ``<!-- generated: NAME -->`` is
replaced by ``GENERATORS[NAME]()`` at build time, so these pages are rebuilt from the
settings schemas, setup.cfg and the committed report JSON on every ``mkdocs build`` and
cannot drift from them. The tests import this module and check the same output.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import inspect
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"
# The reports the results page is built from (what `pouta-bench` wrote; docs/results.md
# says which command regenerates each).
QUALITY_REPORTS = {
    "pouta": REPORTS / "quality-10min-cpu-2core" / "pouta" / "quality.json",
    "vanilla": REPORTS / "quality-10min-cpu-2core" / "vanilla" / "quality.json",
}
# features and prn, with the validation / report split of each test set
SPLIT_REPORT = REPORTS / "quality-10min-cpu-2core" / "pretrained" / "quality.json"
DEFECTS_REPORT = REPORTS / "quality-10min-cpu-2core" / "defects-aitex" / "quality.json"
REDI_REPORT = REPORTS / "quality-10min-cpu-2core" / "redi" / "quality.json"
REDI_ABLATION_REPORT = REPORTS / "quality-10min-cpu-2core" / "redi-ablations-elpv" / "quality.json"
BENCH_REPORT = REPORTS / "cpu-2core-avx2" / "results.json"
ACCURACY_REPORT = REPORTS / "cpu-2core-avx2" / "accuracy-e2e" / "results.json"
TILING_REPORT = REPORTS / "tiling-cost-cpu-2core" / "result.json"
CUE_WEIGHTS_REPORT = REPORTS / "cue-weights-prn-cpu-2core" / "cue_weights.json"
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)

# Commands whose flat options are their settings (``--set NAME=VALUE``, ``--config``):
# (command, module, main function).
FLAT_COMMANDS = (
    ("pouta-eval", "pouta.trainer.evaluate", "main"),
    ("pouta-export", "pouta.trainer.export", "main"),
    ("pouta-calibrate", "pouta.calibration.cli", "calibrate_main"),
    ("pouta-build-engine", "pouta.calibration.cli", "build_engine_main"),
    ("pouta-bench", "pouta.benchmarks.cli", "main"),
    ("pouta-cost", "pouta.trainer.models.cost", "main"),
    ("pouta-demo", "pouta.trainer.demo", "main"),
    ("pouta-demo-data", "pouta.trainer.data.demo_data", "main"),
)
_OWN = {"help", "set", "print_config", "config"}

# Meanings of flat options that have no help text of their own (by option name).
FLAT_NOTES = {
    "category": "category name inside a multi-category data root",
    "layout": "how the data folder is organised",
    "batch_size": "images scored per batch",
    "no_progress": "no progress bar (logs and CI)",
    "rule": "image threshold rule (Calibration and engines)",
    "pixel_rule": "pixel threshold rule for the anomaly map",
    "pixel_quantile": "normal-quantile pixel rule: the quantile of good parts' map values",
    "calib_method": "INT8 calibration method for the activation ranges",
    "workspace_mb": "TensorRT builder workspace in MiB (trtexec --memPoolSize=workspace:N)",
    "version_compatible": "build a version-compatible plan (runs on later TensorRT runtimes, maybe slower)",
    "min_batch": "smallest batch of the TensorRT optimization profile",
    "opt_batch": "batch the TensorRT profile is tuned for",
    "max_batch": "largest batch of the TensorRT optimization profile",
    "seed": "random seed (same seed, same result)",
    "n_train": "good training images written",
    "n_test_good": "good test images written",
    "texture": "scikit-image photo the surface is cut from",
}

# Meanings of the keys whose schema file carries no comment of its own.
NOTES = {
    "source.loop": "replay the images or video again from the start when they run out",
    "source.serial": "genicam: open the camera with this serial number",
    "source.device_id": "genicam: open the camera with this GenTL device id",
    "source.strobe.pulse_ms": "length of the NG pulse on the strobe line; a second NG during a pulse extends it",
    "preprocess.interpolation": "resize to the model input: area (the training path) or linear",
    "postprocess.pixel_threshold": "null: from the model's metadata (calibrated); anomaly-map level that makes a defect region",
    "postprocess.max_regions": "at most this many defect regions reported per part (largest first)",
    "output.dir": "results folder: parts/*.json, results.csv, latest.json, overlays/",
    "output.json": "one JSON record per part under parts/",
    "output.csv": "one row per part in results.csv",
    "output.latest": "latest.json: the last part's record, replaced atomically",
    "output.overlay_format": "jpg | png: format of the overlay pictures",
    "output.keep_mb": "retention of OK parts' files: megabytes",
    "output.ng_keep_mb": "retention of NG/NOT_INSPECTED evidence: megabytes",
    "output.fsync": "fsync each record before it counts as written (survives a power cut)",
    "pipeline.queue_size": "frames waiting for inference at most; beyond it the policy applies",
    "pipeline.max_frames": "stop after this many frames (null: run until the source ends or a signal)",
    "pipeline.status_interval": "seconds between status lines and status.json updates",
    "modbus.enabled": "start the Modbus TCP server (--modbus)",
    "modbus.host": "address the Modbus server listens on",
    "modbus.ack_timeout_s": "handshake: seconds a result is held for the PLC's acknowledgement",
    "opcua.enabled": "start the OPC UA server (--opcua)",
    "opcua.endpoint": "endpoint URL the OPC UA server listens on",
    "opcua.ack_timeout_s": "handshake: seconds a result is held for AckResult / AckSequence",
    "mqtt.enabled": "publish every part to an MQTT broker (--mqtt)",
    "mqtt.host": "broker host name or address",
    "mqtt.port": "broker port",
    "mqtt.topic_prefix": "topics are <prefix>/result, <prefix>/status, ... (Line integration)",
    "mqtt.keepalive_s": "MQTT keep-alive interval in seconds",
    "http.enabled": "serve the operator live view and /metrics (--http)",
    "opcua.private_key": "the server certificate's private key (PEM); null: made with the self-signed certificate",
    "mqtt.username": "broker user name (null: no authentication)",
    "mqtt.password_env": "environment variable holding the broker password (instead of password_file)",
    "mqtt.ca_file": "CA bundle that signs the broker's certificate (TLS); null: the system CAs",
    "mqtt.key_file": "private key of cert_file",
    "http.tls_key": "private key of tls_cert (PEM)",
    "model.backbone": "features / prn / redi: the frozen pretrained trunk (efficientnet_lite0, resnet18, wide_resnet50_2)",
    "model.backbone_weights": "features / prn / redi: a torchvision-layout state dict for the backbone; null: the packaged weights",
    "model.memory_size": "features / prn: normal patch features kept in the memory (coreset rows)",
    "model.distance_scale": "features / redi: the raw distance map's normaliser k (map = d / (d + k)), fitted on good parts",
    "model.prn_width": "prn: channels of the residual and attention blocks",
    "model.prototypes": "prn: normal patch prototypes per scale; 0 until fitted from the good parts before training (memory_size / 4)",
    "model.redi_structure": "redi: the self-generated structure map the recover network sees: hog | edges (Sobel magnitude)",
    "model.redi_hog_bins": "redi: HOG orientation bins over 0-180 degrees",
    "model.redi_gallery": "redi: good parts kept in the model as retrieval prompts (farthest-point picked)",
    "model.redi_width": "redi: recover U-Net width (levels w/2, w, 2w, 4w)",
    "model.redi_hip": "redi: the recover network sees the structure map and a retrieved good part (false: the raw image, ablation)",
    "model.redi_self_correlation": "redi: train with the self-correlation loss L_S (false: ablation)",
    "model.redi_frb": "redi: Feature Recovery Block on the recovery branch (false: ablation)",
    "model.redi_train_crop": "redi: 0 (default) trains on the whole input; a multiple of 32: on random windows of that side (cheaper steps on a CPU)",
    "model.kind": "which model: one of the registry's kinds (pouta, vanilla: the DRAEM-style baseline)",
    "model.variant": "full, or a POUTA ablation: base (neither), hsg (hierarchical guidance only), mss (multi-scale supervision only)",
    "model.preset": "tiny (CPU, 128x128) | paper (224x224, the paper's widths)",
    "model.height": "model input height in pixels (a tile's height when tiled)",
    "model.width": "model input width in pixels (a tile's width when tiled)",
    "model.cue_scales": "the reconstruction cue's two normalisers, fitted after training (null until then)",
    "data.category": "category name inside a multi-category root (VisA objects, ...)",
    "data.layout": "auto | mvtec | visa | dagm | folder: how the data folder is organised",
    "synthesis.anomaly_prob": "share of training samples that get a synthetic anomaly",
    "synthesis.perlin_max_scale": "Perlin grid resolution per axis is 2**randint(min, max), max exclusive",
    "synthesis.threshold": "Perlin noise level above which a pixel is anomalous",
    "synthesis.beta_max": "blend factor of the anomaly texture, drawn from [0, beta_max]",
    "synthesis.texture_dir": "folder of anomaly textures (e.g. DTD); null: scikit-image's bundled photos",
    "synthesis.fuse_weight": "range of w in src = w * texture + (1 - w) * transformed image",
    "train.lr_gamma": "factor the learning rate is multiplied by at each milestone",
    "train.seed": "random seed (data order, synthesis, initial weights)",
    "train.checkpoint_every": "steps between last.pt checkpoints (for --resume)",
    "train.log_every": "steps between progress lines",
    "out": "run folder: model.pt, last.pt, train_log, synthesis_<mode>.png",
}


# -- the settings schemas --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Key:
    """One setting: dotted name, type, default (YAML), meaning."""

    name: str
    type: str
    default: str
    meaning: str
    flags: str = ""


def yaml_comments(text: str) -> dict[str, str]:
    """Dotted key -> its comment in a YAML file (inline, plus comment-only lines under it)."""
    notes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last: str | None = None
    for line in text.splitlines():
        body = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        m = re.match(r"^( *)([A-Za-z_][\w-]*):", body)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            last = ".".join(k for _, k in stack)
            if comment:
                notes[last] = comment
        elif not body and comment and last is not None and line.startswith(" ") and last in notes:
            notes[last] += " " + comment  # a comment continued on the next line
        elif not line.strip():
            last = None
    return notes


def dataclass_notes(cls: type) -> dict[str, str]:
    """Field -> meaning from a dataclass: ``name``: text in its docstring, and the comments
    on or above each field in its source."""
    notes: dict[str, str] = {}
    doc = " ".join((cls.__doc__ or "").split())
    for m in re.finditer(r"``(\w+)``:\s*(.+?)(?=\s``\w+``:|$)", doc):
        notes[m.group(1)] = m.group(2).strip()
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"^(\w+): [^=]+=", s)
        if m:
            inline = s.split("  # ", 1)[1] if "  # " in s else ""
            text = " ".join([*above, inline]).strip()
            if text:
                notes.setdefault(m.group(1), text)
        above = []
    return notes


def _type_of(name: str, value: Any, alternatives: dict[str, tuple[type, ...]]) -> str:
    words = {bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "mapping"}
    if name in alternatives:
        kinds = [words.get(t, t.__name__) for t in alternatives[name]]
        if not isinstance(value, tuple(alternatives[name])) and value is not None:
            kinds.insert(0, words.get(type(value), type(value).__name__))
        return " or ".join(dict.fromkeys(kinds))
    if value is None:
        return "any (null)"
    if isinstance(value, tuple):
        return "list"
    return words.get(type(value), type(value).__name__)


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def nested_keys(schema: Any, notes: dict[str, str]) -> list[Key]:
    """Every leaf of a nested ``Schema`` (free-form mappings are one key)."""
    out: list[Key] = []

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and v and name not in schema.free_form:
                walk(v, name + ".")
            else:
                out.append(
                    Key(name, _type_of(name, v, schema.alternatives), _default(v), notes.get(name, ""))
                )

    walk(schema.defaults, "")
    return out


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def command_parser(module: str, func: str) -> argparse.ArgumentParser:
    """The parser a command's ``main`` builds, caught where it would parse its arguments."""
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *_a: Any, **_k: Any) -> Any:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        getattr(import_module(module), func)([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{module}.{func} did not parse arguments")


def flat_keys(parser: argparse.ArgumentParser) -> list[Key]:
    out = []
    for a in parser._actions:
        if a.dest in _OWN or a.dest == argparse.SUPPRESS:
            continue
        if a.nargs == 0 and isinstance(a.const, bool):
            kind = "bool"
        elif a.choices is not None:
            kind = " | ".join(str(c) for c in a.choices)
        elif a.type is not None:
            kind = {int: "int", float: "number", str: "string", Path: "path"}.get(a.type, "string")
        else:
            kind = "string" if a.default is None else _type_of(a.dest, a.default, {})
        default = a.default
        if isinstance(default, Path):
            default = str(default)
        flags = ", ".join(f"`{o}`" for o in a.option_strings) or "positional"
        meaning = " ".join(
            (a.help or FLAT_NOTES.get(a.dest, ""))
            .replace("%(default)s", str(a.default))
            .replace("%%", "%")
            .split()
        )
        out.append(Key(a.dest, kind, _default(default), meaning, flags))
    return out


def schemas() -> Iterator[tuple[str, str, list[Key]]]:
    """(command, how its settings are given, keys) for every command with a settings schema."""
    from pouta.edge.config import run_schema
    from pouta.trainer.models import ModelConfig
    from pouta.trainer.synthesis.anomalies import SynthesisConfig
    from pouta.trainer.train_config import train_schema

    run = run_schema()
    text = (ROOT / "edge" / "configs" / "default.yaml").read_text(encoding="utf-8")
    notes = {**NOTES, **yaml_comments(text)}
    yield "pouta-edge run", "YAML (`--config`), `--set section.key=VALUE`, flags", nested_keys(run, notes)
    notes = dict(NOTES)
    notes.update({f"model.{k}": v for k, v in dataclass_notes(ModelConfig).items()})
    notes.update({f"synthesis.{k}": v for k, v in dataclass_notes(SynthesisConfig).items()})
    notes.update(yaml_comments((ROOT / "trainer" / "configs" / "tiny.yaml").read_text(encoding="utf-8")))
    yield (
        "pouta-train",
        "YAML (`--config`), `--set section.key=VALUE`, flags",
        nested_keys(train_schema("tiny"), notes),
    )
    for command, module, func in FLAT_COMMANDS:
        yield (
            command,
            "`--config` YAML of option names, `--set name=VALUE`, flags",
            flat_keys(command_parser(module, func)),
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    lines = []
    for command, how, keys in schemas():
        lines += [f"## {command}", "", f"Settings: {how}.", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys:
            key = f"`{k.name}` ({k.flags})" if k.flags else f"`{k.name}`"
            lines.append(f"| {key} | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.meaning) or '-'} |")
        lines.append("")
    return "\n".join(lines)


# -- install extras ----------------------------------------------------------------------


def extras() -> dict[str, list[str]]:
    """Extra -> the distributions it installs (names only), from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    out: dict[str, list[str]] = {"(none)": []}
    for line in cfg["options"]["install_requires"].splitlines():
        if line.strip():
            out["(none)"].append(re.split(r"[<>=!;\[ ]", line.strip(), maxsplit=1)[0])
    for extra, reqs in cfg["options.extras_require"].items():
        out[extra] = [
            re.split(r"[<>=!;\[ ]", r.strip(), maxsplit=1)[0]
            for r in reqs.splitlines()
            if r.strip() and not r.strip().startswith("#")
        ]
    return out


def extras_table() -> str:
    lines = ["| extra | installs |", "|---|---|"]
    for extra, names in extras().items():
        label = extra if extra == "(none)" else f"`[{extra}]`"
        lines.append(f"| {label} | {', '.join(names)} |")
    return "\n".join(lines)


# -- results -----------------------------------------------------------------------------


def _f3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def quality_rows() -> list[dict[str, Any]]:
    rows = []
    for path in QUALITY_REPORTS.values():
        rows += json.loads(path.read_text(encoding="utf-8"))["rows"]
    return rows


def _geometry(row: dict[str, Any]) -> str:
    """A quality row's input: whole image or its tiles per frame."""
    tiles = row["input"].get("tiles_per_image") or 1
    return "whole image" if not row["input"].get("tiling") else f"{tiles:g} tiles"


def quality_table() -> str:
    reports = {k: json.loads(p.read_text(encoding="utf-8")) for k, p in QUALITY_REPORTS.items()}
    lines = [
        "| category | model | input | image AUROC | pixel AUROC | pixel AP | AUPRO | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, rep in reports.items():
        for r in rep["rows"]:
            geometry = _geometry(r)
            lines.append(
                f"| {r['category']} | {kind} | {geometry} | {_f3(r['image_auroc'])} | {_f3(r.get('pixel_auroc'))} "
                f"| {_f3(r.get('pixel_ap'))} | {_f3(r.get('aupro'))} | {r['steps']} |"
            )
        m = rep["means"][kind]
        lines.append(
            f"| **mean** | {kind} | | {_f3(m['image_auroc'])} | {_f3(m.get('pixel_auroc'))} "
            f"| {_f3(m.get('pixel_ap'))} | {_f3(m.get('aupro'))} | |"
        )
    return "\n".join(lines)


def quality_split_table(report: Path = SPLIT_REPORT) -> str:
    """The pretrained-backbone kinds on the report split (never used to choose a default)
    and the validation split, with recall at zero false rejects."""
    rep = json.loads(report.read_text(encoding="utf-8"))
    lines = [
        "| category | model | image AUROC (report) | recall @ 0 FR (report) | image AUROC (val) "
        "| recall @ 0 FR (val) | pixel AUROC | input |",
        "|---|---|---|---|---|---|---|---|",
    ]

    from pouta.benchmarks.sections.quality import row_metric

    def split(r: dict[str, Any], name: str, metric: str) -> str:
        return _f3(row_metric(r, f"{name}/{metric}"))

    for r in rep["rows"]:
        geometry = _geometry(r)
        lines.append(
            f"| {r['category']} | {r['kind']} | {split(r, 'report', 'image_auroc')} "
            f"| {split(r, 'report', 'recall_at_zero_fr')} | {split(r, 'val', 'image_auroc')} "
            f"| {split(r, 'val', 'recall_at_zero_fr')} | {_f3(r.get('pixel_auroc'))} | {geometry} |"
        )
    for label, means in (
        ("mean", rep["means"]),
        ("mean over the categories both ran", rep.get("common_means") or {}),
    ):
        for kind, m in means.items():
            lines.append(
                f"| **{label}** | {kind} | {_f3(m.get('report/image_auroc'))} | {_f3(m.get('report/recall_at_zero_fr'))} "
                f"| {_f3(m.get('val/image_auroc'))} | {_f3(m.get('val/recall_at_zero_fr'))} "
                f"| {_f3(m.get('pixel_auroc'))} | |"
            )
    return "\n".join(lines)


def cue_weights_table() -> str:
    """PRN's head weight per split, as ``pouta-bench --sections cue-weights`` tabulates it."""
    from pouta.benchmarks.sections.cue_weights import markdown

    return "\n".join(markdown(json.loads(CUE_WEIGHTS_REPORT.read_text(encoding="utf-8"))))


def bench_targets() -> str:
    res = json.loads(BENCH_REPORT.read_text(encoding="utf-8"))
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {_cell(t['target'])} | {_cell(t['value'])} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def accuracy_table() -> str:
    rows = json.loads(ACCURACY_REPORT.read_text(encoding="utf-8"))["sections"]["accuracy"]["rows"]
    lines = [
        "| model | precision | runtime | image AUROC | pixel AUROC | pixel AP | ORT CPU batch 1, median ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        ms = r.get("ort_cpu_b1_median_ms")
        lines.append(
            f"| {r['kind']} | {r['precision']} | {r['runtime']} | {_f3(r['image_auroc'])} | {_f3(r['pixel_auroc'])} "
            f"| {_f3(r['pixel_ap'])} | {'-' if ms is None else f'{ms:.1f}'} |"
        )
    return "\n".join(lines)


def tiling_table() -> str:
    res = json.loads(TILING_REPORT.read_text(encoding="utf-8"))
    names = {
        "whole": "narrow model, whole image",
        "tiled": "narrow model, tiled",
        "tiled_auto": "default tiled model (twice the discriminator widths)",
    }
    h, w = res["source"]
    lines = [
        f"Frames of {w}×{h} pixels, {res['frames']} frames × {res['rounds']} rounds.",
        "",
        "| model | tiles per frame | ms per frame | pipeline fps |",
        "|---|---|---|---|",
    ]
    for key, label in names.items():
        r = res[key]
        lines.append(f"| {label} | {r['tiles_per_frame']} | {r['ms_per_frame']} | {r['pipeline_fps']} |")
    lines += [
        "",
        f"Each extra tile adds {res['added_ms_per_tile']} ms (cutting and stitching "
        f"{res['pre_post_ms_per_tile']} ms of it); the default tiled model costs "
        f"{res['tiled_auto_over_tiled']}× the narrow tiled one.",
    ]
    return "\n".join(lines)


def modbus_registers() -> str:
    """The register map exactly as the Modbus server defines it."""
    from pouta.edge.sinks.modbus import REGISTERS

    lines = ["| address | name | words | access | meaning |", "|---|---|---|---|---|"]
    for addr, name, words, access, meaning in REGISTERS:
        where = str(addr) if words == 1 else f"{addr}–{addr + words - 1}"
        lines.append(f"| {where} | {name} | {words} | {access} | {_cell(meaning)} |")
    return "\n".join(lines)


def quality_chart_markdown() -> str:
    return "![image and pixel AUROC per category, POUTA and vanilla](img/quality.png)"


def write_quality_chart(path: Path) -> Path:
    from pouta.benchmarks.sections.quality import chart

    reports = [json.loads(p.read_text(encoding="utf-8")) for p in QUALITY_REPORTS.values()]
    merged = {
        "minutes": reports[0]["minutes"],
        "rows": [r for rep in reports for r in rep["rows"]],
        "means": {k: v for rep in reports for k, v in rep["means"].items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    chart(merged, path)
    return path


GENERATORS: dict[str, Callable[[], str]] = {
    "config-reference": config_reference,
    "extras-table": extras_table,
    "quality-table": quality_table,
    "quality-split-table": quality_split_table,
    "quality-defects-table": lambda: quality_split_table(DEFECTS_REPORT),
    "quality-redi-table": lambda: quality_split_table(REDI_REPORT),
    "quality-redi-ablation-table": lambda: quality_split_table(REDI_ABLATION_REPORT),
    "quality-chart": quality_chart_markdown,
    "cue-weights-table": cue_weights_table,
    "bench-targets": bench_targets,
    "accuracy-table": accuracy_table,
    "tiling-table": tiling_table,
    "modbus-registers": modbus_registers,
}


def render(markdown: str) -> str:
    """A page with every ``<!-- generated: NAME -->`` line replaced by its content."""
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


# -- MkDocs hook events --------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    # Drawn outside docs/ so the source tree stays clean; MkDocs copies it into the site.
    chart_dir = Path(tempfile.mkdtemp(prefix="pouta-docs-"))
    write_quality_chart(chart_dir / "img" / "quality.png")
    files.append(File("img/quality.png", str(chart_dir), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown)
