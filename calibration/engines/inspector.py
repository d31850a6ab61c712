"""Layer precisions of a built TensorRT engine, from the engine inspector's JSON (pure Python,
so the rules are tested without TensorRT)."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import CalibrationError

_PRECISION_PATTERNS = (
    ("int8", re.compile(r"\bint8\b", re.IGNORECASE)),
    ("fp16", re.compile(r"\b(fp16|half)\b", re.IGNORECASE)),
    ("fp32", re.compile(r"\b(fp32|float)\b", re.IGNORECASE)),
)


def _tensor_precision(desc: dict[str, Any]) -> str | None:
    # 10.x: "Format/Datatype": "Row major linear FP16 format"; 11.x splits it into
    # "Format" and "DataType" ("Half", "Float", "Int8").
    text = " ".join(str(desc.get(k, "")) for k in ("Format/Datatype", "DataType", "Format"))
    for name, pattern in _PRECISION_PATTERNS:
        if pattern.search(text):
            return name
    return None


def _layers(engine_info_json: str) -> list[Any]:
    try:
        info = json.loads(engine_info_json)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"engine inspector returned invalid JSON ({exc})") from None
    return list(info.get("Layers", []))


def layer_precisions(engine_info_json: str) -> dict[str, str]:
    """Layer name -> precision of its output (or 'unknown') from DETAILED inspector JSON."""
    out: dict[str, str] = {}
    for i, layer in enumerate(_layers(engine_info_json)):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity: names without detail
            out[layer] = "unknown"
            continue
        name = str(layer.get("Name", f"layer_{i}"))
        precs = [p for p in (_tensor_precision(t) for t in layer.get("Outputs", [])) if p]
        # A layer computing in int8 may emit a higher-precision output (dequantizing
        # epilogue); report the lowest precision among its inputs and outputs.
        precs += [p for p in (_tensor_precision(t) for t in layer.get("Inputs", [])) if p]
        order = {"int8": 0, "fp16": 1, "fp32": 2}
        out[name] = min(precs, key=order.__getitem__) if precs else "unknown"
    return out


def fused_layer_names(engine_info_json: str) -> list[str]:
    """Layers that are whole fused subgraphs (Myelin / ForeignNode): their I/O types hide
    the precision inside, where the convolutions run."""
    names = []
    for i, layer in enumerate(_layers(engine_info_json)):
        name = layer if isinstance(layer, str) else str(layer.get("Name", f"layer_{i}"))
        kind = "" if isinstance(layer, str) else str(layer.get("LayerType", ""))
        if "myelin" in kind.lower() or "ForeignNode" in name:
            names.append(name)
    return names


def check_precisions(
    precisions: dict[str, str], wanted: str, trt_major: int = 10, fused: tuple[str, ...] | list[str] = ()
) -> tuple[dict[str, int], list[str]]:
    """(counts per precision, warnings); raises when FP16/INT8 was asked for and provably
    nothing runs in it.

    Not provable, so a warning: on 8.6 the FP16 flag only *allows* FP16 and TensorRT keeps
    FP32 where it is faster; on 10/11 a net fused into Myelin layers shows only their FP32
    I/O tensors.
    """
    counts: dict[str, int] = {}
    for p in precisions.values():
        counts[p] = counts.get(p, 0) + 1
    warnings: list[str] = []
    if wanted not in ("fp16", "int8") or not precisions:
        return counts, warnings
    fused_set = set(fused)
    hidden = bool(fused_set) and all(
        name in fused_set for name, p in precisions.items() if p in ("fp32", "unknown")
    )
    reduced = counts.get("fp16", 0) + counts.get("int8", 0)
    if reduced == 0:
        msg = f"asked for {wanted.upper()} but every engine layer runs in FP32 ({counts})"
        if hidden:
            warnings.append(
                f"{msg} as far as the inspector shows: {len(fused_set)} fused Myelin layer(s) hide their "
                "inner precision; compare its speed with an FP32 build to be sure"
            )
        elif trt_major == 8 and wanted == "fp16":
            warnings.append(
                f"{msg}: TensorRT 8.6 treats FP16 as allowed, not required, and chose FP32 kernels "
                "(faster for this network on this GPU)"
            )
        else:
            raise CalibrationError(f"{msg}; the GPU or the ONNX types do not allow reduced precision")
        return counts, warnings
    if wanted == "int8" and counts.get("int8", 0) == 0:
        msg = f"asked for INT8 but no engine layer runs in INT8 ({counts})"
        if not hidden:
            raise CalibrationError(msg)
        warnings.append(f"{msg} as far as the inspector shows (fused Myelin layers hide their precision)")
    return counts, warnings
