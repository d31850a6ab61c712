"""Checkpoints: plain tensors + JSON only, loadable with ``torch.load(weights_only=True)``.

One file ``*.pt`` holds a dict of tensors, numbers, strings and lists (no pickled
objects): model ``state_dict``, optimizer/scheduler ``state_dict``s, the step, RNG
states, and the model config / train config / info as JSON strings. It is written to a
temporary file in the same folder and renamed, so a kill -9 never leaves a half file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pouta.edge.contract.errors import ConfigError
from pouta.edge.contract.fsutil import atomic_path
from torch import nn

from .models import ModelConfig, build_model

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    cfg: ModelConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int = 0,
    rng: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint (temp file + fsync + rename in the destination folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": json.dumps(cfg.to_dict()),
        "train_config": json.dumps(train_config or {}),
        "info": json.dumps(info or {}),
        "step": int(step),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler if isinstance(scheduler, dict) else scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if rng is not None:
        payload["rng"] = rng
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict (JSON fields decoded), loaded with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{p}: not a readable POUTA checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ConfigError(f"{p}: not a POUTA checkpoint (missing 'model' / 'model_config')")
    for key in ("model_config", "train_config", "info"):
        ck[key] = json.loads(ck.get(key) or "{}")
    return ck


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig, dict]:
    """(model in eval mode on ``device``, its ModelConfig, info dict incl. step and train config)."""
    ck = read_checkpoint(path)
    cfg = ModelConfig.from_dict(ck["model_config"], source=f"{path}: model_config")
    model = build_model(cfg, pretrained=False)  # the checkpoint carries every weight
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: weights do not match the stored model config ({first})") from None
    model.to(device).eval()
    info = dict(ck["info"])
    info["step"] = int(ck.get("step", 0))
    info["train_config"] = ck["train_config"]
    return model, cfg, info
