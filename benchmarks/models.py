"""Thin adapters onto ``pouta.trainer`` (models, cost, export, checkpoints).

The benchmark only talks to the trainer through this module, so an API change there is
fixed in one place. torch is imported lazily: the edge-only install has none.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .common import log


def make_config(
    preset: str, kind: str, variant: str = "full", height: int | None = None, width: int | None = None
) -> Any:
    from pouta.trainer.models import preset_config

    # The vanilla baseline has no ablation switches; the config still wants a valid name.
    return preset_config(
        preset, kind=kind, variant=variant if kind == "pouta" else "full", height=height, width=width
    )


def build(cfg: Any) -> Any:
    from pouta.trainer.models import build_model

    model = build_model(cfg)
    model.eval()
    return model


def count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def inference_forward(model: Any) -> Any:
    """``model(x)`` on the deployed graph: ``aux=False`` drops training-only heads when supported.

    The exported ONNX graph is built this way, so eager and ONNX latency time the same work.
    """
    try:
        takes_aux = "aux" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_aux = False
    if takes_aux:
        return lambda x: model(x, aux=False)
    return model


def _pick(d: dict[str, Any], *names: str) -> float | None:
    lower = {k.lower(): v for k, v in d.items()}
    for n in names:
        v = lower.get(n.lower())
        if isinstance(v, int | float):
            return float(v)
    return None


def own_cost(cfg: Any, height: int, width: int) -> dict[str, Any]:
    """Params and FLOPs with ``FlopCounterMode`` on the inference graph (fallback for ``model_cost``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build(cfg)
    fwd = inference_forward(model)
    x = torch.zeros(1, 3, height, width)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fwd(x)
    flops = float(counter.get_total_flops())
    return {
        "params": count_params(model),
        "flops": flops,
        "macs": flops / 2.0,
        "source": "benchmarks.own_cost",
    }


def model_cost(cfg: Any, height: int, width: int) -> dict[str, Any]:
    """``{"params", "macs", "flops", "source", "raw"}`` whatever key spelling the trainer uses.

    ``flops`` are true FLOPs (FlopCounterMode counts a multiply-add as 2), ``macs`` are
    multiply-accumulates (what thop/fvcore/ptflops print and call "FLOPs").
    """
    try:
        from pouta.trainer.models.cost import model_cost as trainer_cost
    except ImportError as exc:
        log(f"pouta.trainer.models.cost unavailable ({exc}); counting with FlopCounterMode here")
        return own_cost(cfg, height, width)
    raw = trainer_cost(cfg, height, width)
    if not isinstance(raw, dict):
        raw = dict(vars(raw))
    params = _pick(raw, "params", "parameters", "n_params", "num_params")
    flops = _pick(raw, "flops", "true_flops", "flops_true")
    macs = _pick(raw, "macs", "gmacs_raw", "mac")
    if macs is None and flops is not None:
        macs = flops / 2.0
    if flops is None and macs is not None:
        flops = macs * 2.0
    if params is None or flops is None:
        log(f"model_cost returned {sorted(raw)}; counting with FlopCounterMode here")
        return own_cost(cfg, height, width)
    return {
        "params": int(params),
        "flops": flops,
        "macs": macs,
        "source": "pouta.trainer.models.cost.model_cost",
        "raw": {k: v for k, v in raw.items() if isinstance(v, int | float | str | bool)},
    }


def export(model: Any, cfg: Any, path: Path, height: int, width: int) -> Path:
    from pouta.trainer.export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if "parity_batches" in inspect.signature(export_onnx).parameters:
        # One parity batch is enough to catch a broken export; the second one doubles the
        # export time of the paper-size models on a CPU.
        kwargs["parity_batches"] = (1,)
    res = export_onnx(model, cfg, path, height, width, **kwargs)
    # Some exporters return the path, others a result object: the file is what counts.
    out = Path(res) if isinstance(res, str | Path) else path
    if not out.is_file():
        raise FileNotFoundError(f"export_onnx did not write {out}")
    return out


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
