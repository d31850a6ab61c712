"""``pouta-cost``: parameters, MACs and FLOPs of the paper/tiny models (paper Table 5).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts a
multiply-add as 2 FLOPs; MACs = FLOPs / 2. The paper's "35.37G FLOPs" for POUTA at
224x224 matches our MAC count, i.e. the paper (like thop/ptflops) reports MACs.
Costs are for inference (``aux=False``: no MSS heads, no image head in POUTA), batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.settings import add_config_args, parse_hw, settings_or_exit
from torch.utils.flop_counter import FlopCounterMode

from . import build_model, count_params
from .config import BACKBONE_KINDS, VARIANTS, ModelConfig, check_input_size, preset_config


def model_cost(cfg: ModelConfig, height: int, width: int) -> dict[str, Any]:
    """Params and inference MACs/FLOPs of ``cfg``'s model on one [1,3,height,width] input."""
    check_input_size(height, width, "model_cost", cfg.size_multiple)
    model = build_model(cfg.with_(height=height, width=width)).eval()
    x = torch.rand(1, 3, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, aux=False)
    flops = int(counter.get_total_flops())
    return {
        "kind": cfg.kind,
        "variant": cfg.variant if cfg.kind == "pouta" else cfg.kind,
        "preset": cfg.preset,
        "height": height,
        "width": width,
        "params": count_params(model),
        # the part trained from scratch (POUTA/vanilla: the autoencoder) or frozen (backbone kinds)
        "params_autoencoder": count_params(model.ae) if hasattr(model, "ae") else 0,
        "params_trainable": sum(
            p.numel()
            for n, p in model.named_parameters()
            if not n.startswith(("backbone.", "features.backbone."))
        ),
        "macs": flops // 2,
        "flops": flops,
    }


def all_costs(
    height: int = 224, width: int = 224, presets: tuple[str, ...] = ("paper", "tiny")
) -> list[dict]:
    rows = []
    for preset in presets:
        for variant in VARIANTS:
            rows.append(model_cost(preset_config(preset, "pouta", variant), height, width))
        rows.append(model_cost(preset_config(preset, "vanilla"), height, width))
    # The pretrained-backbone kinds have one size whatever the preset (their memories at
    # their default size; the cost of the distance grows with it).
    if "tiny" in presets:
        for kind in BACKBONE_KINDS:
            rows.append(model_cost(preset_config("tiny", kind), height, width))
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'preset':<7} {'model':<14} {'params (M)':>10} {'AE params (M)':>13} {'MACs (G)':>9} {'FLOPs (G)':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['kind']}-{r['variant']}" if r["kind"] == "pouta" else r["kind"]
        lines.append(
            f"{r['preset']:<7} {name:<14} {r['params'] / 1e6:>10.3f} {r['params_autoencoder'] / 1e6:>13.3f} "
            f"{r['macs'] / 1e9:>9.2f} {r['flops'] / 1e9:>10.2f}"
        )
    by = {(r["preset"], r["kind"], r["variant"]): r for r in rows}
    for preset in sorted({r["preset"] for r in rows}):
        p, v = by.get((preset, "pouta", "full")), by.get((preset, "vanilla", "vanilla"))
        if p and v:
            lines.append(
                f"{preset}: POUTA/vanilla FLOP ratio {p['flops'] / v['flops']:.3f}, "
                f"param ratio {p['params'] / v['params']:.3f}"
            )
    lines.append("FLOPs = 2 x MACs (multiply-add = 2 FLOPs). Paper Table 5 (its 'FLOPs' are MACs): ")
    lines.append("POUTA 15.02M params / 35.37G, vanilla 28.68M / 39.38G at 224x224.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pouta-cost", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="224x224", help="input HxW (default 224x224)")
    ap.add_argument("--preset", action="append", choices=["paper", "tiny"], help="preset(s), default both")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(ap, config_file=True)
    args = ap.parse_args(argv)
    settings_or_exit(ap, args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        h, w = parse_hw(args.size)
    except ConfigError as exc:
        sys.exit(f"pouta-cost: {exc}")
    try:
        rows = all_costs(h, w, tuple(args.preset or ("paper", "tiny")))
    except Exception as exc:  # one-line CLI error
        sys.exit(f"pouta-cost: {exc}")
    print(json.dumps(rows, indent=2) if args.json else _table(rows))


if __name__ == "__main__":
    main()
