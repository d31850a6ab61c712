"""The package layout: small folders that show the runtime, and no stale import paths.

``edge/``, ``calibration/`` and ``trainer/`` were flat folders; they are cut into
subpackages, edge/ along the pipeline (contract, sources, backends, sinks, liveview),
calibration/ along its outputs (thresholds, artifacts, engines), trainer/ along what
training consumes (data: readers and the training set; synthesis: made-up anomalies; the
models). These tests keep it that way: no folder grows past the limit, the old flat
modules stay gone, every ``pouta.edge...``, ``pouta.calibration...`` or
``pouta.trainer...`` path named anywhere in the repository (code, tests, docs, Docker,
CI) resolves, and the pipeline's stages import only what comes before them.
"""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "edge"
CUT = {
    "edge": EDGE,
    "calibration": ROOT / "calibration",
    "trainer": ROOT / "trainer",
}  # pouta.<name> -> folder
MAX_MODULES = 15  # per folder, ``__init__`` included

# The flat modules before the cut: still a top-level module, a package now (which
# re-exports nothing), or gone.
OLD_FLAT = {
    "edge": {
        "module": "auth cli config doctor drift frame_queue pipeline postprocess sequence service stats",
        "package": "sources sinks liveview",
        "gone": "backend cuda_memory errors fanout feedback fsutil genicam genicam_nodes geometry "
        "handshake liveview_server loop_thread metadata metrics modbus_server mqtt_publisher "
        "opcua_server overlay preprocess records settings shadow tensorrt_backend",
    },
    "calibration": {
        "module": "calibset cli errors scoring steps",
        "package": "thresholds",
        "gone": "binomial engine_inspect fp16 guard holdout operating_point plots qdq_check quantize "
        "report tensorrt_build",
    },
    "trainer": {
        "module": "checkpoint demo evaluate export geometry losses metrics train train_config train_log watchdog",
        "package": "data synthesis",
        "gone": "augment defect_modes demo_data textures training_set",
    },
    "benchmarks": {
        "module": "artifacts cli common models report report_charts synthetic timing",
        "package": "",
        "gone": "accuracy cost cue_weights endtoend latency liveview_load quality runtime_overhead tiling_cost",
    },
}
OLD_CASES = [
    (top, kind, name)
    for top, kinds in OLD_FLAT.items()
    for kind, names in kinds.items()
    for name in names.split()
]
SUBPACKAGES = {
    "edge": ("contract", "backends", "sources", "sinks", "liveview"),
    "calibration": ("thresholds", "artifacts", "engines"),
    "trainer": ("data", "synthesis", "models"),
    "benchmarks": ("sections",),
}
# The model registry is the models package's API (``build_model``, ``KINDS``), as in timm.
REGISTRY_INITS = {"trainer/models/__init__.py"}

SKIP_DIRS = {".git", ".venv", "__pycache__", "site", "build", "dist", "runs", "demo", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".cfg", ".toml", ".txt", ".sh", ".in"}


def _folders(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]


@pytest.mark.parametrize("top", sorted(CUT))
def test_no_folder_holds_more_than_the_limit(top: str) -> None:
    for folder in _folders(CUT[top]):
        modules = sorted(p.name for p in folder.glob("*.py"))
        assert len(modules) <= MAX_MODULES, f"{folder.relative_to(ROOT)}: {len(modules)} modules"


@pytest.mark.parametrize("top", sorted(CUT))
def test_folders_are_cut_into_subpackages(top: str) -> None:
    for name in SUBPACKAGES[top]:
        spec = importlib.util.find_spec(f"pouta.{top}.{name}")
        assert spec is not None and spec.submodule_search_locations, name


def test_live_view_static_files_are_package_data_of_the_live_view() -> None:
    static = importlib.resources.files("pouta.edge.liveview").joinpath("static")
    assert static.joinpath("index.html").is_file() and static.joinpath("app.js").is_file()


@pytest.mark.parametrize(("top", "kind", "old"), OLD_CASES)
def test_old_flat_module_paths_are_gone(top: str, kind: str, old: str) -> None:
    spec = importlib.util.find_spec(f"pouta.{top}.{old}")
    if kind == "module":
        assert spec is not None and spec.submodule_search_locations is None
    elif kind == "package":
        # The name is a package now, which re-exports nothing: an old
        # ``from pouta.edge.sinks import ResultWriter`` fails instead of silently working.
        assert spec is not None and spec.submodule_search_locations is not None
        pkg = importlib.import_module(f"pouta.{top}.{old}")
        public = [n for n in vars(pkg) if not n.startswith("__")]
        assert not set(public) - {m.stem for m in (CUT[top] / old).glob("*.py")}, public
    else:
        assert spec is None, f"pouta.{top}.{old} still imports"


@pytest.mark.parametrize("top", sorted(CUT))
def test_package_inits_state_their_rule_and_export_nothing(top: str) -> None:
    for init in CUT[top].rglob("__init__.py"):
        if str(init.relative_to(ROOT)) in REGISTRY_INITS:
            continue
        tree = ast.parse(init.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert doc and len(doc.split()) > 10, f"{init.relative_to(ROOT)}: state the package's rule"
        assert len(tree.body) == 1, f"{init.relative_to(ROOT)}: only a docstring, no re-exports"


def _text_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts):
            continue
        if p.is_file() and (
            p.suffix in TEXT_SUFFIXES or p.name.startswith("Dockerfile") or p.parent.name == ".ci"
        ):
            out.append(p)
    return out


# also right after a backslash-n: code written into a string for a subprocess
START = r"(?:(?<=\\n)|\b)"
DOTTED = re.compile(START + r"pouta\.(edge|calibration|trainer|benchmarks)((?:\.\w+)+)")
FROM_TOP = re.compile(START + r"from pouta\.(edge|calibration|trainer|benchmarks) import ([\w ,]+)")


def _resolves(dotted: str) -> bool:
    """A dotted path under ``pouta.<top>``: each package step is a real subpackage or
    module, and what follows the first plain module is one of its attributes."""
    parts = dotted.split(".")
    name = ".".join(parts[:2])
    for i, part in enumerate(parts[2:], start=2):
        candidate = f"{name}.{part}"
        spec = importlib.util.find_spec(candidate)
        if spec is None:
            return False
        name = candidate
        if spec.submodule_search_locations is None:
            rest = parts[i + 1 :]
            return not rest or hasattr(importlib.import_module(name), rest[0])
    return True


def test_every_path_named_in_the_repository_resolves() -> None:
    stale = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in DOTTED.finditer(text):
            dotted = f"pouta.{m[1]}{m[2]}"
            if not _resolves(dotted):
                stale.append(f"{path.relative_to(ROOT)}: {dotted}")
        for m in FROM_TOP.finditer(text):
            for name in m[2].split(","):
                base = name.split(" as ")[0].strip()
                if base and importlib.util.find_spec(f"pouta.{m[1]}.{base}") is None:
                    stale.append(f"{path.relative_to(ROOT)}: from pouta.{m[1]} import {base}")
    assert not stale, "\n".join(stale)


def _pouta_imports(top: str, path: Path) -> set[str]:
    """The pouta modules a module imports (relative imports resolved), lazy ones included."""
    package = ["pouta", top, *path.parent.relative_to(CUT[top]).parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            out.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pouta."):
            out.add(node.module or "")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pouta."))
    return out


# What a subpackage may import from pouta. edge/: the pipeline's stages depend on the
# contract and on earlier stages, never on the wiring (cli, config, service) or on the
# live view that sits on top of them. calibration/: thresholds, artifacts and engines
# are independent of each other and of the commands that chain them (cli, steps).
CONTRACT = "pouta.edge.contract"
ALLOWED = {
    ("edge", "contract"): (CONTRACT, "pouta.edge.postprocess"),
    ("edge", "sources"): (CONTRACT, "pouta.edge.sources", "pouta.edge.postprocess"),
    ("edge", "backends"): (CONTRACT, "pouta.edge.backends"),
    ("edge", "sinks"): (
        CONTRACT,
        "pouta.edge.sinks",
        "pouta.edge.postprocess",
        "pouta.edge.sources.protocol",
        "pouta.edge.backends.protocol",
        "pouta.edge.auth",
    ),
    ("calibration", "thresholds"): (
        CONTRACT,
        "pouta.calibration.thresholds",
        "pouta.calibration.errors",
        "pouta.calibration.calibset",
    ),
    ("calibration", "artifacts"): (
        CONTRACT,
        "pouta.calibration.artifacts",
        "pouta.calibration.errors",
        "pouta.trainer.metrics",
    ),
    ("calibration", "engines"): (
        CONTRACT,
        "pouta.calibration.engines",
        "pouta.calibration.errors",
        "pouta.edge.backends.tensorrt",
    ),
    # Made-up anomalies need only the contract (image reading, errors); the training set
    # reads, synthesises and sizes inputs for a model config.
    ("trainer", "synthesis"): (CONTRACT, "pouta.trainer.synthesis"),
    ("trainer", "data"): (
        CONTRACT,
        "pouta.trainer.data",
        "pouta.trainer.synthesis",
        "pouta.trainer.geometry",
        "pouta.trainer.models",
        "pouta.trainer.train_config",
    ),
}


@pytest.mark.parametrize(("top", "package"), sorted(ALLOWED))
def test_subpackages_import_only_what_comes_before_them(top: str, package: str) -> None:
    wrong = []
    for path in (CUT[top] / package).glob("*.py"):
        for name in _pouta_imports(top, path):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[top, package]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
