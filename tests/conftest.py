from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Small helper modules under tests/ (contract_models) import by name.
sys.path.insert(0, str(Path(__file__).parent))

# Two cores in CI: keep every library from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def brightness_onnx(tmp_path: Path) -> Path:
    from contract_models import make_brightness_model

    return make_brightness_model(tmp_path / "model.onnx")
