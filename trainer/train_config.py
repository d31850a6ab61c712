"""``pouta-train``'s configuration: the packaged preset YAML is the schema and the defaults.

Layers (``pouta.edge.contract.settings``): preset defaults (``configs/tiny.yaml`` or ``paper.yaml``,
the model section completed from ``ModelConfig``, synthesis from ``SynthesisConfig``)
<- ``--config FILE`` <- ``--set KEY=VALUE`` <- flags. An unknown key or a wrong type is a
one-line error naming the key, before any data are read.
"""

from __future__ import annotations

import argparse
import dataclasses
from importlib import resources
from typing import Any

import yaml
from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.settings import Schema, merge, parse_hw, parse_sets, read_yaml, resolve

from .geometry import AUTO_WIDTHS, cue_setting, map_blur_setting, width_setting
from .models import BACKBONE_KINDS, ModelConfig, preset_config
from .synthesis.anomalies import SynthesisConfig

PRESETS = ("tiny", "paper")
# Training defaults a kind needs other than the preset's (PRN: the paper's weight decay).
KIND_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "prn": {"batch_size": 4, "lr": 5.0e-4, "weight_decay": 1.0e-2},
    "redi": {"batch_size": 2, "lr": 1.0e-3},
}
# Settings a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE_OVERRIDES: tuple[str, ...] = (
    "device",
    "time_limit_min",
    "num_workers",
    "eval_at_end",
    "stall_timeout_s",
)


def packaged_config(name: str) -> dict[str, Any]:
    """A config shipped in ``pouta.trainer/configs`` (``tiny`` or ``paper``)."""
    ref = resources.files("pouta.trainer").joinpath("configs", f"{name}.yaml")
    if not ref.is_file():
        raise ConfigError(f"config '{name}': no packaged configs/{name}.yaml (expected tiny or paper)")
    return yaml.safe_load(ref.read_text(encoding="utf-8"))


def train_schema(preset: str = "tiny", kind: str = "pouta", variant: str = "full") -> Schema:
    """Every key the trainer reads, with its default, for one model identity."""
    defaults = packaged_config(preset)
    model = preset_config(preset, kind, variant).to_dict()
    packaged_model = dict(defaults.get("model", {}))
    if kind in BACKBONE_KINDS:  # the preset's size is for the from-scratch kinds
        packaged_model.pop("height", None)
        packaged_model.pop("width", None)
    defaults["model"] = {
        **model,
        **packaged_model,
        "preset": preset,
        "kind": kind,
        "variant": variant,
    }
    defaults["train"] = {**defaults["train"], **KIND_TRAIN_DEFAULTS.get(kind, {})}
    defaults["synthesis"] = {**dataclasses.asdict(SynthesisConfig()), **(defaults.get("synthesis") or {})}
    return Schema(
        defaults,
        alternatives={
            "data.tile_scale": (str, float),  # auto | off | a scale
            "model.reconstruction_cue": (bool, str),  # auto | true | false
            "model.disc_widths": (list, str),  # auto | 4 integers
            "model.fusion_width": (int, str),  # auto | an integer
            "model.map_sigma_hw": (list, str),  # auto | null | [rows, columns]
            "train.time_limit_min": (float,),
            "train.threads": (int,),  # null = torch's default
            "synthesis.texture_dir": (str,),
            "data.defects": (str,),
        },
        free_form=frozenset({"synthesis.modes"}),
    )


def resolve_auto_model(
    m: dict[str, Any], tiled: bool, axis_downscale: tuple[float, float] | None = None
) -> None:
    """Fix the model fields ``auto`` leaves to the input geometry (``geometry`` rules), in place.

    ``axis_downscale``: a whole-image input's source pixels per input pixel (rows, columns);
    None reads as a geometry that keeps the part's proportions.
    """
    m["reconstruction_cue"] = cue_setting(m.get("reconstruction_cue", False), tiled)
    m["map_sigma_hw"] = map_blur_setting(m.get("map_sigma_hw"), m["map_sigma"], axis_downscale)
    preset = preset_config(m["preset"], m["kind"], m["variant"])
    for key in AUTO_WIDTHS:
        if key in m:
            m[key] = width_setting(key, m[key], getattr(preset, key), tiled)


def model_config_from(cfg: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` a training config describes (``auto`` fields read as for a whole
    image until ``resolve_geometry`` has fixed them from the data)."""
    m = dict(cfg["model"])
    resolve_auto_model(m, tiled=False)
    return preset_config(m.pop("preset"), m.pop("kind"), m.pop("variant"), **m)


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    """What the command-line flags say, as a config layer."""
    layer: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}}
    for section, key, value in (
        ("data", "root", args.data),
        ("data", "category", args.category),
        ("data", "defects", args.defects),
        ("model", "preset", args.preset),
        ("model", "variant", args.variant),
        ("model", "kind", args.kind),
        ("train", "steps", args.steps),
        ("train", "batch_size", args.batch_size),
        ("train", "seed", args.seed),
        ("train", "device", args.device),
        ("train", "time_limit_min", args.time_limit_min),
    ):
        if value is not None:
            layer[section][key] = value
    if args.size == "auto":
        layer["data"].update(aspect_size=True, tile_scale="off")
    elif args.size:
        layer["model"]["height"], layer["model"]["width"] = parse_hw(args.size)
    if args.tile_scale is not None:
        layer["data"]["tile_scale"] = yaml.safe_load(args.tile_scale)
    if args.eval:
        layer["train"]["eval_at_end"] = True
    out: dict[str, Any] = {k: v for k, v in layer.items() if v}
    if args.out is not None:
        out["out"] = args.out
    return out


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The merged training config for these command-line arguments (checked, not yet run)."""
    config_file = None if args.config in (None, *PRESETS) else args.config
    file_layer = read_yaml(config_file) if config_file else {}
    sets, flags = parse_sets(args.set), _flag_layer(args)
    # The model identity picks the schema, so it is looked up through the layers first.
    identity = {
        "preset": args.config if args.config in PRESETS else "tiny",
        "kind": None,
        "variant": "full",
    }
    for layer in (file_layer, sets, flags):
        model = layer.get("model")
        if isinstance(model, dict):
            identity.update({k: model[k] for k in identity if model.get(k) is not None})
    if identity["preset"] not in PRESETS:
        raise ConfigError(f"model.preset: expected one of {', '.join(PRESETS)}, got {identity['preset']!r}")
    if identity["kind"] is None:  # the preset's own kind: tiny -> features, paper -> pouta
        identity["kind"] = packaged_config(str(identity["preset"]))["model"]["kind"]
    cfg = resolve(train_schema(**identity), config_file, args.set, flags)
    t = cfg["train"]
    if t["steps"] <= 0 or t["batch_size"] <= 0:
        raise ConfigError("train.steps / train.batch_size: expected positive integers")
    if t["threads"] is not None and t["threads"] <= 0:  # 0 would silently mean null
        raise ConfigError(
            f"train.threads: expected a positive integer or null (torch's default), got {t['threads']}"
        )
    model_config_from(cfg)  # size and width rules: fail now, not after the data are loaded
    return cfg


def resume_config(stored: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config on today's defaults, with the few settings a resume may change."""
    m = stored.get("model", {})
    schema = train_schema(m.get("preset", "tiny"), m.get("kind", "pouta"), m.get("variant", "full"))
    cfg = merge(schema.defaults, stored, schema)
    for key in overrides:
        if key not in RESUMABLE_OVERRIDES:
            raise ConfigError(
                f"train.{key}: cannot be changed on resume (allowed: {', '.join(RESUMABLE_OVERRIDES)})"
            )
    return merge(cfg, {"train": overrides}, schema) if overrides else cfg
