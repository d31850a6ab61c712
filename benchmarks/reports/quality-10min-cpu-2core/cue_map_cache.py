"""Cache both cues' maps of a trained whole-image model, so fusion rules can be compared offline.

Same trained weights, evaluated like ``pouta-eval``: the discriminator's map ``a`` and the
reconstruction error ``r`` (1 - local SSIM, the model's ``cue_error: ssim``, whatever the
checkpoint was fitted with), blurred as the image score sees them, on the 64 normal
training inputs ``pouta-train`` fits the cue scales on and on every test image; for
categories with masks also blurred as the returned map is, with the masks at map size.

    python cue_map_cache.py RUN_DIR DATA OUT.npz        (repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from pouta.trainer.checkpoint import load_model
from pouta.trainer.data import open_dataset
from pouta.trainer.geometry import preprocessor_for_training
from pouta.trainer.models.layers import discriminator_map
from pouta.trainer.train import CUE_FIT_INPUTS
from pouta.trainer.training_set import build_training_set, training_paths


@torch.inference_mode()
def cue_maps(model: torch.nn.Module, x: np.ndarray, smoothing: torch.nn.Module | None) -> np.ndarray:
    """Inputs [N,3,H,W] -> [N,2,H,W] float16: (a, r) blurred by ``smoothing``."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = model(t, aux=True)
    a = discriminator_map(out.logits, smoothing)
    r = model.cues.reconstruction_error(t, out.reconstruction, smoothing)
    return torch.cat([a, r], dim=1).numpy().astype(np.float16)


def main(argv: list[str]) -> int:
    run, data, out = Path(argv[0]), argv[1], argv[2]
    torch.set_num_threads(2)
    model, cfg, info = load_model(run / "model.pt")
    model.eval()
    model.cues.error = "ssim"
    train_cfg = info["train_config"]
    pre = preprocessor_for_training(train_cfg, int(cfg.height), int(cfg.width))
    dataset, _ = build_training_set(train_cfg, cfg, training_paths(train_cfg))
    normal = dataset.normal_inputs(CUE_FIT_INPUTS)
    normal_maps = np.concatenate(
        [cue_maps(model, normal[i : i + 8], model.smoothing) for i in range(0, len(normal), 8)]
    )
    test = open_dataset(data, split="test")
    pixel_smoothing = model.map_smoothing or model.smoothing
    scored, shown, labels, masks = [], [], [], []
    for i, rec in enumerate(test.records):
        img, mask = test.load(i, pre)
        scored.append(cue_maps(model, img[None], model.smoothing)[0])
        if test.has_masks:
            shown.append(cue_maps(model, img[None], pixel_smoothing)[0])
            masks.append(np.zeros(img.shape[1:], bool) if mask is None else np.asarray(mask) > 0.5)
        labels.append(rec.label)
    extra = {"shown": np.stack(shown), "masks": np.stack(masks)} if shown else {}
    np.savez_compressed(
        out,
        normal=normal_maps,
        scored=np.stack(scored),
        labels=np.array(labels),
        steps=info.get("step"),
        **extra,
    )
    print(out, normal_maps.shape, len(labels), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
