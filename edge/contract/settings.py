"""One configuration layer for every command: defaults <- YAML file <- ``--set KEY=VALUE`` <- flags.

``pouta-edge run``, ``pouta-train``, ``pouta-build-engine`` and ``pouta-bench`` all merge
their settings here. The defaults are the schema:

- a key that is not in the defaults is refused, naming it and the keys that exist there;
- a value whose type differs from its default's is refused, naming the key, the expected
  type and the value (a float default takes integers too; a null default takes anything;
  ``Schema.alternatives`` lists the keys that take more than one type, e.g. a tile scale
  that is ``auto``, ``off`` or a number);
- a mapping default is merged key by key, except the free-form mappings of
  ``Schema.free_form`` (camera node maps, synthesis mode weights), which are replaced
  whole and checked by their owner.

Every error is one line (``ConfigError``) that names the key. ``--print-config`` on each
command prints the merged result with ``dump``.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Schema:
    """Defaults plus what they cannot say on their own."""

    defaults: dict[str, Any]
    alternatives: dict[str, tuple[type, ...]] = field(default_factory=dict)
    free_form: frozenset[str] = frozenset()


def _type_name(t: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        t, t.__name__
    )


def _accepts(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is list:
        return isinstance(value, list | tuple)
    return isinstance(value, t)


def check_value(path: str, value: Any, default: Any, schema: Schema) -> Any:
    """``value`` if its type fits the default (or the key's alternatives); else ConfigError."""
    if path not in schema.alternatives:
        if default is None:
            return value  # a free key: its reader checks it
    elif value is None:
        return value
    if isinstance(default, os.PathLike) and isinstance(value, str | os.PathLike):
        return type(default)(value)
    allowed = schema.alternatives.get(path) or (list if isinstance(default, tuple) else type(default),)
    if any(_accepts(value, t) for t in allowed):
        return value
    if float in allowed and isinstance(value, str):
        # PyYAML reads 2e-4 (no dot) as a string; a number is what was meant.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and str in allowed:
        # A word key given unquoted off/on (or no/yes): YAML made it a boolean.
        return "on" if value else "off"
    expected = " or ".join(_type_name(t) for t in allowed)
    raise ConfigError(f"{path}: expected {expected}, got {value!r}")


def merge(base: dict[str, Any], override: dict[str, Any], schema: Schema, where: str = "") -> dict[str, Any]:
    """``base`` with ``override`` merged in; unknown keys and wrong types are one-line errors."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            known = ", ".join(sorted(base)) or "none"
            raise ConfigError(f"{path}: unknown key (known{' in ' + where[:-1] if where else ''}: {known})")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {value!r}")
            out[key] = (
                copy.deepcopy(value)
                if path in schema.free_form
                else merge(default, value, schema, f"{path}.")
            )
        else:
            out[key] = check_value(path, value, default, schema)
    return out


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. train.lr=1e-3), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{part}' is set to a value and used as a section")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing file or bad YAML is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def resolve(
    schema: Schema,
    config_file: str | os.PathLike[str] | None = None,
    sets: Sequence[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults <- YAML file <- ``--set`` items <- flags (each layer checked against the schema)."""
    cfg = copy.deepcopy(schema.defaults)
    if config_file is not None:
        cfg = merge(cfg, read_yaml(config_file), schema)
    for layer in (parse_sets(sets), flags or {}):
        if layer:
            cfg = merge(cfg, layer, schema)
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    """The merged configuration as YAML, in schema order (what ``--print-config`` prints)."""
    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=False)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def add_config_args(parser: argparse.ArgumentParser, config_file: bool = False) -> None:
    """``--set KEY=VALUE`` and ``--print-config`` (and ``--config FILE``) on a command's parser."""
    if config_file:
        parser.add_argument("--config", metavar="YAML", help="settings file (any option, by its name)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any setting, e.g. n_calib=64")
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged settings (YAML) and exit"
    )


OWN_ARGS = ("set", "print_config", "config")


def resolve_namespace(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    alternatives: dict[str, tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    """A flat command's settings: its options' defaults <- ``--config`` <- ``--set`` <- given flags.

    ``args`` is updated in place (values from the file or ``--set`` go through the option's
    own type, e.g. ``Path``); the merged settings are returned for ``--print-config``.
    """
    actions = {a.dest: a for a in parser._actions if a.dest not in (*OWN_ARGS, "help")}
    defaults = {dest: parser.get_default(dest) for dest in actions}
    given = {k: v for k, v in vars(args).items() if k in actions and v != defaults[k]}
    cfg = resolve(Schema(defaults, alternatives or {}), getattr(args, "config", None), args.set)
    for dest, value in cfg.items():
        conv = actions[dest].type
        if dest not in given and isinstance(value, str) and callable(conv):
            try:
                value = conv(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{dest}: {value!r} is not valid ({exc})") from None
        choices = actions[dest].choices
        if dest not in given and choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{dest}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        setattr(args, dest, given.get(dest, value))
        cfg[dest] = getattr(args, dest)
    return cfg


def settings_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``resolve_namespace`` for a command without its own error handling: a bad setting
    exits with the one-line error, ``--print-config`` prints the settings and exits 0."""
    try:
        cfg = resolve_namespace(parser, args)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    if args.print_config:
        print(dump(cfg), end="")
        parser.exit(0)


def parse_hw(text: str, what: str = "--size") -> tuple[int, int]:
    """``"128x96"`` -> (128, 96): height x width, the one spelling every command takes."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        raise ConfigError(f"{what}: expected HxW such as 224x224, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{what}: expected positive sizes, got {text!r}")
    return h, w


def hw_arg(text: str) -> tuple[int, int]:
    """``parse_hw`` as an argparse ``type`` (argparse reports the error with the option name)."""
    try:
        return parse_hw(text, "size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None
