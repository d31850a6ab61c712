"""Thin adapters onto ``pouta.trainer`` (models, cost, export, checkpoints).

The benchmark only talks to the trainer through this module, so an API change there is
fixed in one place. torch is imported lazily: the edge-only install has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_config(
    preset: str,
    kind: str,
    variant: str = "full",
    height: int | None = None,
    width: int | None = None,
    **overrides: Any,
) -> Any:
    from pouta.trainer.models import preset_config

    # The vanilla baseline has no ablation switches; the config still wants a valid name.
    return preset_config(
        preset,
        kind=kind,
        variant=variant if kind == "pouta" else "full",
        height=height,
        width=width,
        **overrides,
    )


def build(cfg: Any) -> Any:
    from pouta.trainer.models import build_model

    model = build_model(cfg)
    model.eval()
    return model


def count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def inference_forward(model: Any) -> Any:
    """``model(x)`` on the deployed graph: ``aux=False`` drops training-only heads.

    The exported ONNX graph is built this way, so eager and ONNX latency time the same work.
    """
    return lambda x: model(x, aux=False)


def model_cost(cfg: Any, height: int, width: int) -> dict[str, Any]:
    """``{"params", "macs", "flops", "source", "raw"}`` from the trainer's one cost counter.

    ``flops`` are true FLOPs (FlopCounterMode counts a multiply-add as 2), ``macs`` are
    multiply-accumulates (what thop/fvcore/ptflops print and call "FLOPs").
    """
    from pouta.trainer.models.cost import model_cost as trainer_cost

    raw = trainer_cost(cfg, height, width)
    return {
        "params": int(raw["params"]),
        "flops": float(raw["flops"]),
        "macs": float(raw["macs"]),
        "source": "pouta.trainer.models.cost.model_cost",
        "raw": {k: v for k, v in raw.items() if isinstance(v, int | float | str | bool)},
    }


def random_model(preset: str, height: int, width: int, **overrides: Any) -> tuple[Any, Any]:
    """(model, config) of a POUTA with seed-0 random weights: speed does not depend on them."""
    import torch

    torch.manual_seed(0)
    cfg = make_config(preset, "pouta", height=height, width=width, **overrides)
    return build(cfg), cfg


def export(model: Any, cfg: Any, path: Path, height: int, width: int, tiling: Any = None) -> Path:
    """ONNX + sidecar; ``tiling`` (``pouta.edge.contract.geometry.Tiling``) makes it a tiled model."""
    from pouta.trainer.export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    # One parity batch is enough to catch a broken export; the second one doubles the
    # export time of the paper-size models on a CPU.
    export_onnx(model, cfg, path, height, width, parity_batches=(1,), tiling=tiling)
    return path


def onnx_batch_dim(path: Path) -> int | None:
    """The fixed batch size of an ONNX model's ``image`` input, or None when it is dynamic."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for inp in m.graph.input:
        if inp.name == "image":
            d = inp.type.tensor_type.shape.dim[0]
            return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
    return None


def load_checkpoint(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    from pouta.trainer.checkpoint import load_model

    model, cfg, info = load_model(path)
    model.eval()
    return model, cfg, info if isinstance(info, dict) else {"info": str(info)}


def config_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return json.loads(json.dumps(cfg.to_dict(), default=str))
    return {"repr": repr(cfg)}
