"""``pouta-export``: checkpoint -> ONNX with the exported-model contract + metadata sidecar.

    pouta-export runs/bottle/model.pt -o model.onnx [--size HxW] [--opset 17]

Contract (``pouta.edge.contract.metadata``): input ``image`` float32 [N,3,H,W] RGB in [0,1];
outputs ``anomaly_map`` [N,1,H,W] in [0,1] and ``score`` [N] (21x21 average-pool max,
inside the graph); the batch axis is dynamic. The graph is traced from the inference
path only (``aux=False``): no MSS heads, no POUTA image head, BatchNorm in eval mode.
The export is checked with ``onnx.checker`` and against PyTorch in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pouta.edge.contract.errors import ConfigError, PoutaError
from pouta.edge.contract.fsutil import atomic_path, sha256_file
from pouta.edge.contract.geometry import Tiling
from pouta.edge.contract.metadata import (
    INPUT_NAME,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_SCORE,
    InputSpec,
    ModelMetadata,
    metadata_path,
)
from pouta.edge.contract.settings import add_config_args, parse_hw, settings_or_exit
from torch import nn

from .checkpoint import load_model
from .geometry import tiling_of
from .models import ModelConfig, check_input_size

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportWrapper(nn.Module):
    """image [N,3,H,W] -> (anomaly_map [N,1,H,W], score [N]): the deployable graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image, aux=False)
        return out.anomaly_map, out.score


class ExportError(PoutaError):
    """The exported graph fails its checks (checker, parity)."""


def export_onnx(
    model: nn.Module,
    cfg: ModelConfig,
    path: str | os.PathLike[str],
    height: int,
    width: int,
    opset: int = DEFAULT_OPSET,
    checkpoint_sha256: str = "",
    training_info: dict[str, Any] | None = None,
    tiling: Tiling | None = None,
    tolerance: float = PARITY_TOLERANCE,
    parity_batches: tuple[int, ...] = (1, 2),
) -> dict[str, Any]:
    """Export ``model`` to ``path``, verify it, write ``<path>.json``; returns a report dict.

    Report keys: path, metadata, opset, max_abs_diff_map, max_abs_diff_score, artifact_sha256.
    Raises ``ExportError`` when the ONNX Runtime outputs differ from PyTorch by more than
    ``tolerance``.
    """

    if opset < 17:
        raise ConfigError(f"--opset: expected 17 or newer, got {opset}")
    check_input_size(height, width, "export size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model.cpu().eval()).eval()
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        diffs = _export_checked(wrapper, example, tmp, opset, height, width, parity_batches)
        if diffs["map"] > tolerance or diffs["score"] > tolerance:
            raise ExportError(
                f"{path}: ONNX Runtime differs from PyTorch (max abs diff map {diffs['map']:.3g}, "
                f"score {diffs['score']:.3g} > tolerance {tolerance:g})"
            )
    artifact_sha = sha256_file(path)
    meta = ModelMetadata(
        model_kind=cfg.kind,
        variant=cfg.variant if cfg.kind == "pouta" else cfg.kind,
        preset=cfg.preset,
        model_config=cfg.with_(height=height, width=width).to_dict(),
        input=InputSpec(
            height=height,
            width=width,
            tile_scale=tiling.scale if tiling else 0.0,
            tile_overlap=tiling.overlap if tiling else InputSpec.tile_overlap,
        ),
        precision="fp32",
        source_checkpoint_sha256=checkpoint_sha256,
        artifact_sha256=artifact_sha,
        training=dict(training_info or {}),
        build={"exporter": "torch.onnx (TorchScript, dynamo=False)", "opset": opset, "parity": diffs},
    )
    meta_path = meta.save(metadata_path(path))
    return {
        "path": str(path),
        "metadata": str(meta_path),
        "opset": opset,
        "max_abs_diff_map": diffs["map"],
        "max_abs_diff_score": diffs["score"],
        "artifact_sha256": artifact_sha,
    }


def _export_checked(
    wrapper: nn.Module,
    example: torch.Tensor,
    tmp: Path,
    opset: int,
    height: int,
    width: int,
    parity_batches: tuple[int, ...],
) -> dict[str, float]:
    """Trace to ``tmp``, run the ONNX checker, measure ONNX Runtime vs PyTorch."""
    import onnx

    with warnings.catch_warnings():
        # The legacy exporter warns about dynamo; the traced graph is what we want here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_ANOMALY_MAP, OUTPUT_SCORE],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_ANOMALY_MAP: {0: "N"}, OUTPUT_SCORE: {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    return _parity(wrapper, tmp, height, width, parity_batches)


def _parity(wrapper: nn.Module, onnx_path: Path, height: int, width: int, batches: tuple[int, ...]) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1234)
    worst = {"map": 0.0, "score": 0.0}
    for n in batches:
        x = torch.rand(n, 3, height, width, generator=gen)
        with torch.no_grad():
            ref_map, ref_score = (t.numpy() for t in wrapper(x))
        got_map, got_score = sess.run([OUTPUT_ANOMALY_MAP, OUTPUT_SCORE], {INPUT_NAME: x.numpy()})
        if got_map.shape != ref_map.shape or got_score.shape != ref_score.shape:
            raise ExportError(
                f"{onnx_path}: ONNX output shapes {got_map.shape}, {got_score.shape} differ from "
                f"PyTorch {ref_map.shape}, {ref_score.shape}"
            )
        worst["map"] = max(worst["map"], float(np.abs(got_map - ref_map).max()))
        worst["score"] = max(worst["score"], float(np.abs(got_score - ref_score).max()))
    return worst


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """``export_onnx`` for a checkpoint file (size defaults to the training size)."""
    model, cfg, info = load_model(checkpoint)
    h, w = size or (cfg.height, cfg.width)
    training = {k: v for k, v in info.items() if k != "train_config"}
    training["train_config"] = info.get("train_config", {}).get("train", {})
    training["trained_size"] = [cfg.height, cfg.width]
    # A tiled model keeps its tiling at its trained tile size; another size is a whole-image input.
    tiling = tiling_of(info.get("train_config", {})) if (h, w) == (cfg.height, cfg.width) else None
    return export_onnx(
        model,
        cfg,
        out,
        h,
        w,
        opset=opset,
        checkpoint_sha256=sha256_file(checkpoint),
        training_info=training,
        tiling=tiling,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pouta-export", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="model.pt / last.pt written by pouta-train")
    ap.add_argument(
        "-o", "--output", required=True, help="output .onnx path (metadata goes to <output>.json)"
    )
    ap.add_argument("--size", help="input HxW (default: the training size), multiples of 16")
    ap.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 17, default {DEFAULT_OPSET})"
    )
    add_config_args(ap, config_file=True)
    args = ap.parse_args(argv)
    settings_or_exit(ap, args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        size = parse_hw(args.size) if args.size else None
        rep = export_checkpoint(args.checkpoint, args.output, size, args.opset)
    except PoutaError as exc:
        sys.exit(f"pouta-export: {exc}")
    print(
        f"pouta-export: wrote {rep['path']} (opset {rep['opset']}) and {rep['metadata']}; "
        f"ONNX Runtime vs PyTorch max abs diff: anomaly_map {rep['max_abs_diff_map']:.2e}, "
        f"score {rep['max_abs_diff_score']:.2e}"
    )


if __name__ == "__main__":
    main()
