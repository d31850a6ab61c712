"""Section 1: paper Table 5 (params, FLOPs) of POUTA vs vanilla, plus the ablation variants."""

from __future__ import annotations

from typing import Any

from .. import models
from ..common import (
    PAPER,
    TARGET_FLOP_RATIO,
    TARGET_PARAMS_TOL,
    VARIANTS,
    Result,
    error_line,
    log,
    ratio,
)


def run_cost(preset: str, height: int, width: int) -> Result:
    from pouta.trainer.models import BACKBONE_KINDS

    rows: dict[str, dict[str, Any]] = {}
    for name, kind, variant in (
        [("pouta", "pouta", "full"), ("vanilla", "vanilla", "full")]
        + [(f"pouta-{v}", "pouta", v) for v in VARIANTS if v != "full"]
        + [(k, k, "full") for k in BACKBONE_KINDS]
    ):
        log(f"cost: {name} ({preset}, {height}x{width}, batch 1)")
        try:
            # the pretrained-backbone kinds have one width whatever the preset
            cfg = models.make_config(
                "tiny" if kind in BACKBONE_KINDS else preset, kind, variant, height, width
            )
            rows[name] = {"kind": kind, "variant": variant, **models.model_cost(cfg, height, width)}
        except Exception as exc:
            rows[name] = {"kind": kind, "variant": variant, "error": error_line(exc)}
    p, v = rows.get("pouta", {}), rows.get("vanilla", {})
    flop_ratio = ratio(p.get("flops"), v.get("flops"))
    params_ratio = ratio(p.get("params"), v.get("params"))
    paper_flop_ratio = PAPER["pouta"]["flops"] / PAPER["vanilla"]["flops"]
    targets: list[dict[str, Any]] = []
    # Params targets only make sense for the paper-size widths at the paper's input size.
    is_paper_setting = preset == "paper" and (height, width) == (224, 224)
    for kind in ("pouta", "vanilla"):
        got = rows.get(kind, {}).get("params")
        want = PAPER[kind]["params"]
        dev = None if got is None else got / want - 1.0
        targets.append(
            {
                "target": f"{kind} params within {TARGET_PARAMS_TOL:.0%} of {want / 1e6:.2f}M",
                "value": None if got is None else f"{got / 1e6:.2f}M ({dev:+.1%})",
                "met": None if dev is None or not is_paper_setting else abs(dev) <= TARGET_PARAMS_TOL,
                "note": ""
                if is_paper_setting
                else f"preset {preset} at {height}x{width}: not the paper setting",
            }
        )
    targets.append(
        {
            "target": f"POUTA/vanilla FLOP ratio <= {TARGET_FLOP_RATIO:.2f}",
            "value": None if flop_ratio is None else f"{flop_ratio:.3f} (paper {paper_flop_ratio:.3f})",
            "met": None if flop_ratio is None or not is_paper_setting else flop_ratio <= TARGET_FLOP_RATIO,
            "note": "same ratio for MACs and FLOPs"
            + ("" if is_paper_setting else f"; preset {preset} at {height}x{width}: not judged"),
        }
    )
    status = "ok" if "error" not in p and "error" not in v else "error"
    out: Result = {
        "status": status,
        "preset": preset,
        "height": height,
        "width": width,
        "batch": 1,
        "rows": rows,
        "flop_ratio": flop_ratio,
        "params_ratio": params_ratio,
        "paper": PAPER,
        "paper_flop_ratio": paper_flop_ratio,
        "paper_params_ratio": PAPER["pouta"]["params"] / PAPER["vanilla"]["params"],
        "targets": targets,
    }
    if status == "error":
        out["error"] = p.get("error") or v.get("error")
    return out
