"""Probe: does a larger tile overlap change a tiled model's ranking (seams, tile borders)?

Evaluates a checkpoint exactly as ``pouta-eval`` does, with ``Tiling.overlap`` set to OVERLAP
instead of the trainer's default.

    python overlap_experiment.py CHECKPOINT DATA OVERLAP OUT_DIR   (from the repository root)
"""

from __future__ import annotations

import sys

import pouta.trainer.geometry as geometry
from pouta.trainer.evaluate import main

if __name__ == "__main__":
    checkpoint, data, overlap, out = sys.argv[1:5]
    geometry.DEFAULT_OVERLAP = float(overlap)
    sys.exit(main(["--checkpoint", checkpoint, "--data", data, "--out", out, "--no-progress"]))
