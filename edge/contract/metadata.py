"""The one metadata schema, shared by export, calibration/engine build and the runtime.

Every model artifact (``model.onnx``, ``model.int8.onnx``, ``model.plan`` ...) has a
JSON sidecar at ``<artifact>.json``. It says what the artifact expects (input size,
colour order, value range), what it is (model kind, variant, preset, precision), where it
came from (hashes, parent artifact, tool versions) and how to judge its output
(thresholds and the rule that chose them). The runtime refuses an artifact whose
sidecar disagrees with the artifact's own tensors or with what it was asked to run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from .errors import MetadataError
from .fsutil import atomic_write_json

SCHEMA_VERSION = 1

# The exported model contract: one definition, imported by export, build and runtime.
INPUT_NAME = "image"
OUTPUT_ANOMALY_MAP = "anomaly_map"
OUTPUT_SCORE = "score"
SCORE_POOL_SIZE = 21  # image score = max of the 21x21 (stride 1) average-pooled map
COLOR_ORDER = "RGB"
VALUE_RANGE = (0.0, 1.0)

MODEL_KINDS = ("pouta", "vanilla", "prn", "features", "redi", "test")  # "test": the suite's contract models
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class InputSpec:
    """Shape and encoding of the ``image`` input, per image ([3, height, width])."""

    height: int
    width: int
    channels: int = 3
    color_order: str = COLOR_ORDER
    value_range: tuple[float, float] = VALUE_RANGE
    layout: str = "NCHW"
    dtype: str = "float32"
    # Tiled models: the frame is rescaled by tile_scale and cut into height x width tiles
    # overlapping by tile_overlap (``pouta.edge.contract.preprocess.Tiling``); 0 = whole image.
    tile_scale: float = 0.0
    tile_overlap: float = 0.25


@dataclass
class Thresholds:
    """Pass/fail decision: image score > ``image`` -> NG; map > ``pixel`` -> defect pixel."""

    image: float
    pixel: float
    rule: str  # e.g. "normal-max-margin", "normal-quantile", "f1-optimal"
    params: dict[str, Any] = field(default_factory=dict)
    n_normal: int = 0
    n_defect: int = 0
    normal_score_stats: dict[str, float] = field(default_factory=dict)
    defect_score_stats: dict[str, float] = field(default_factory=dict)
    scored_with: str = ""  # artifact file name whose outputs were used (fp32/int8 ...)
    # What a quality engineer signs: the objective with its stated-confidence bound and the
    # rates measured on held-out parts (``pouta.calibration.thresholds.operating_point``).
    operating_point: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelMetadata:
    model_kind: str
    input: InputSpec
    precision: str = "fp32"
    variant: str = "full"
    preset: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    source_checkpoint_sha256: str = ""
    artifact_sha256: str = ""
    parent_artifact: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_utc: str = ""
    schema_version: int = SCHEMA_VERSION

    # -- identity ---------------------------------------------------------
    @property
    def model_id(self) -> str:
        """Short identifier for result files: kind-variant-precision-hash8."""
        h = (self.artifact_sha256 or self.source_checkpoint_sha256 or "unknown")[:8]
        return f"{self.model_kind}-{self.variant}-{self.precision}-{h}"

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"]["value_range"] = list(self.input.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "metadata") -> ModelMetadata:
        if not isinstance(d, dict):
            raise MetadataError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise MetadataError(
                f"{source}: schema_version {version!r} is not supported, expected {SCHEMA_VERSION}"
            )
        for key in ("model_kind", "input"):
            if key not in d:
                raise MetadataError(f"{source}: missing required field '{key}'")
        try:
            inp = dict(d["input"])
            if "value_range" in inp:
                inp["value_range"] = tuple(inp["value_range"])
            input_spec = InputSpec(**_known(InputSpec, inp))
            thr = d.get("thresholds")
            thresholds = Thresholds(**_known(Thresholds, thr)) if thr else None
            rest = {k: v for k, v in _known(cls, d).items() if k not in ("input", "thresholds")}
            meta = cls(input=input_spec, thresholds=thresholds, **rest)
        except TypeError as exc:
            raise MetadataError(f"{source}: malformed field ({exc})") from None
        meta.validate(source)
        return meta

    def validate(self, source: str = "metadata") -> None:
        if self.model_kind not in MODEL_KINDS:
            raise MetadataError(f"{source}: model_kind {self.model_kind!r}, expected one of {MODEL_KINDS}")
        if self.precision not in PRECISIONS:
            raise MetadataError(f"{source}: precision {self.precision!r}, expected one of {PRECISIONS}")
        i = self.input
        if not (isinstance(i.height, int) and isinstance(i.width, int) and i.height > 0 and i.width > 0):
            raise MetadataError(
                f"{source}: input.height/width must be positive integers, got {i.height}x{i.width}"
            )
        if i.channels != 3 or i.color_order != COLOR_ORDER or i.layout != "NCHW":
            raise MetadataError(
                f"{source}: input must be 3-channel RGB NCHW, got channels={i.channels} "
                f"color_order={i.color_order} layout={i.layout}"
            )
        if tuple(i.value_range) != VALUE_RANGE:
            raise MetadataError(f"{source}: input.value_range must be [0, 1], got {list(i.value_range)}")
        t = self.thresholds
        for name in ("image", "pixel") if t is not None else ():
            value = getattr(t, name)
            # Written so that NaN fails too (every comparison with NaN is False).
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise MetadataError(
                    f"{source}: thresholds.{name} must be a finite number in [0, 1], got {value}"
                )

    def save(self, path: str | os.PathLike[str]) -> Path:
        if not self.created_utc:
            self.created_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not self.versions:
            self.versions = tool_versions()
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelMetadata:
        p = Path(path)
        if not p.is_file():
            raise MetadataError(
                f"{p}: metadata file not found (every model needs its '<model>.json' sidecar)"
            )
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
        return cls.from_dict(d, source=str(p))

    def derive(self, **changes: Any) -> ModelMetadata:
        """A copy for a derived artifact (quantized, engine), with fields replaced."""
        return ModelMetadata.from_dict({**self.to_dict(), **_plain(changes)}, source="derived metadata")


def _plain(changes: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in changes.items():
        if isinstance(v, InputSpec | Thresholds):
            v = asdict(v)
        out[k] = v
    return out


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    # Unknown keys from newer writers are ignored rather than fatal.
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _pct(x: float) -> str:
    return f"{100.0 * x:.3g}%"


def _measured_rate(name: str, r: dict[str, Any]) -> str:
    lo, hi = r["ci"]
    tail = " in-sample" if r.get("in_sample") else ""
    return f"{name} {_pct(r['rate'])} [{_pct(lo)}, {_pct(hi)}] ({r['count']}/{r['n']}{tail})"


def operating_point_line(t: Thresholds | None, active_threshold: float | None = None) -> str:
    """One line for the start of a run: the signed objective and what the holdout measured."""
    if t is None:
        return ""
    op = t.operating_point or {}
    if op.get("objective") in ("false_reject", "escape"):
        what = "false rejects" if op["objective"] == "false_reject" else "escapes"
        parts = "good" if op["objective"] == "false_reject" else "defective"
        head = (
            f"{what} <= {_pct(op['target'])} at {_pct(op['confidence'])} confidence (score {op['rank']} of "
            f"{op['n']} {parts} calibration parts, bound {_pct(op['bound'])})"
        )
    else:
        head = f"rule {t.rule} (no stated-confidence bound)"
    m = op.get("measured")
    if m:
        rates = [
            _measured_rate(k.replace("_", " ") + "s", m[k]) for k in ("false_reject", "escape") if k in m
        ]
        by_type = m.get("escape_by_type", {})
        if len(by_type) > 1:
            rates.append(
                "escapes by type " + ", ".join(f"{k} {v['count']}/{v['n']}" for k, v in by_type.items())
            )
        head += f"; held out ({m['split']}, {_pct(m['confidence'])} intervals): " + ", ".join(rates)
    else:
        head += "; no held-out rates (calibrate with --holdout)"
    if active_threshold is not None and abs(active_threshold - t.image) > 1e-12 * max(1.0, abs(t.image)):
        head += f"; the config overrides the threshold {t.image:.6g} with {active_threshold:.6g}: these rates do not apply"
    return f"operating point: threshold {t.image:.6g}, {head}"


def metadata_path(model_path: str | os.PathLike[str]) -> Path:
    """Sidecar path of an artifact: ``model.onnx`` -> ``model.onnx.json``."""
    return Path(f"{os.fspath(model_path)}.json")


def load_for_model(model_path: str | os.PathLike[str]) -> ModelMetadata:
    return ModelMetadata.load(metadata_path(model_path))


def check_io(
    meta: ModelMetadata,
    input_shape: tuple[int | str | None, ...],
    output_names: list[str],
    source: str,
) -> None:
    """Refuse an artifact whose tensors disagree with its metadata.

    ``input_shape`` is the artifact's own ``image`` shape; symbolic dims (batch) may be
    strings, None or -1 and are not checked.
    """
    if len(input_shape) != 4:
        raise MetadataError(f"{source}: input '{INPUT_NAME}' has rank {len(input_shape)}, expected 4 (NCHW)")
    expected = (meta.input.channels, meta.input.height, meta.input.width)
    for axis, (got, want) in enumerate(zip(input_shape[1:], expected, strict=True), start=1):
        if isinstance(got, int) and got > 0 and got != want:
            raise MetadataError(
                f"{source}: input '{INPUT_NAME}' is {list(input_shape)}, but its metadata says "
                f"[N, {expected[0]}, {expected[1]}, {expected[2]}] (axis {axis}: {got} != {want})"
            )
    missing = [n for n in (OUTPUT_ANOMALY_MAP, OUTPUT_SCORE) if n not in output_names]
    if missing:
        raise MetadataError(
            f"{source}: outputs {output_names} lack {missing}, expected '{OUTPUT_ANOMALY_MAP}' and '{OUTPUT_SCORE}'"
        )


def check_request(meta: ModelMetadata, source: str, **expected: Any) -> None:
    """Refuse a model that is not what the user/config asked for (e.g. input size, kind)."""
    actual = {
        "model_kind": meta.model_kind,
        "height": meta.input.height,
        "width": meta.input.width,
        "color_order": meta.input.color_order,
        "precision": meta.precision,
    }
    for key, want in expected.items():
        if want is None:
            continue
        if key not in actual:
            raise MetadataError(f"{source}: cannot check unknown field '{key}'")
        if actual[key] != want:
            raise MetadataError(
                f"{source}: {key} is {actual[key]!r} in the model's metadata, but {want!r} was requested"
            )


ARTIFACT_TOOLS: tuple[str, ...] = (
    "pouta-edge",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "opencv-python-headless",
    "numpy",
)


def tool_versions(dists: tuple[str, ...] = ARTIFACT_TOOLS) -> dict[str, str]:
    """Python and the installed versions of ``dists`` (those that matter for reproducing an
    artifact by default); no heavy imports."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out
