"""The package layout: small folders that show the runtime, and no stale import paths.

``edge/`` was one flat folder; it is now cut into subpackages along the pipeline
(contract, sources, backends, sinks, liveview). These tests keep it that way: no folder
grows past the limit, the old flat modules stay gone, and every ``pouta.edge...`` path
named anywhere in the repository (code, tests, docs, Docker, CI) resolves.
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
MAX_MODULES = 15  # per folder, ``__init__`` included

# The flat modules before the cut. Three names live on as packages (``sources``, ``sinks``,
# ``liveview``); the rest must not import at all.
OLD_FLAT = (
    "auth",
    "backend",
    "cli",
    "config",
    "cuda_memory",
    "doctor",
    "drift",
    "errors",
    "fanout",
    "feedback",
    "frame_queue",
    "fsutil",
    "genicam",
    "genicam_nodes",
    "geometry",
    "handshake",
    "liveview",
    "liveview_server",
    "loop_thread",
    "metadata",
    "metrics",
    "modbus_server",
    "mqtt_publisher",
    "opcua_server",
    "overlay",
    "pipeline",
    "postprocess",
    "preprocess",
    "records",
    "sequence",
    "service",
    "settings",
    "shadow",
    "sinks",
    "sources",
    "stats",
    "tensorrt_backend",
)
STILL_TOP_LEVEL = {
    "auth",
    "cli",
    "config",
    "doctor",
    "drift",
    "frame_queue",
    "pipeline",
    "postprocess",
    "sequence",
    "service",
    "stats",
}
NOW_PACKAGES = {"sources", "sinks", "liveview"}
SUBPACKAGES = ("contract", "backends", "sources", "sinks", "liveview")

SKIP_DIRS = {".git", ".venv", "__pycache__", "site", "build", "dist", "runs", "demo", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".cfg", ".toml", ".txt", ".sh", ".in"}


def _folders(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__")]


def test_no_edge_folder_holds_more_than_the_limit() -> None:
    for folder in _folders(EDGE):
        modules = sorted(p.name for p in folder.glob("*.py"))
        assert len(modules) <= MAX_MODULES, f"{folder.relative_to(ROOT)}: {len(modules)} modules"


def test_edge_is_cut_into_the_pipeline_subpackages() -> None:
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(f"pouta.edge.{name}")
        assert spec is not None and spec.submodule_search_locations, name
    # The live view's static files moved with it and are package data of that package.
    static = importlib.resources.files("pouta.edge.liveview").joinpath("static")
    assert static.joinpath("index.html").is_file() and static.joinpath("app.js").is_file()


@pytest.mark.parametrize("old", OLD_FLAT)
def test_old_flat_module_paths_are_gone(old: str) -> None:
    spec = importlib.util.find_spec(f"pouta.edge.{old}")
    if old in STILL_TOP_LEVEL:
        assert spec is not None and spec.submodule_search_locations is None
    elif old in NOW_PACKAGES:
        # The name is a package now, which re-exports nothing: an old
        # ``from pouta.edge.sinks import ResultWriter`` fails instead of silently working.
        assert spec is not None and spec.submodule_search_locations is not None
        pkg = importlib.import_module(f"pouta.edge.{old}")
        public = [n for n in vars(pkg) if not n.startswith("__")]
        assert not set(public) - {m.stem for m in (EDGE / old).glob("*.py")}, public
    else:
        assert spec is None, f"pouta.edge.{old} still imports"


def test_package_inits_state_their_rule_and_export_nothing() -> None:
    for init in EDGE.rglob("__init__.py"):
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


DOTTED = re.compile(r"\bpouta\.edge((?:\.\w+)+)")
FROM_EDGE = re.compile(r"\bfrom pouta\.edge import ([\w ,]+)")


def _resolves(dotted: str) -> bool:
    """A dotted path under ``pouta.edge``: each package step is a real subpackage or module, and what
    follows the first plain module is one of its attributes."""
    parts = dotted.split(".")
    name = "pouta.edge"
    for i, part in enumerate(parts[2:], start=2):
        candidate = f"{name}.{part}"
        spec = importlib.util.find_spec(candidate)
        if spec is None:
            return False
        name = candidate
        if spec.submodule_search_locations is None:
            rest = parts[i + 1 :]
            if not rest:
                return True
            return hasattr(importlib.import_module(name), rest[0])
    return True


def test_every_edge_path_named_in_the_repository_resolves() -> None:
    stale = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in DOTTED.finditer(text):
            dotted = "pouta.edge" + m[1]
            if not _resolves(dotted):
                stale.append(f"{path.relative_to(ROOT)}: {dotted}")
        for m in FROM_EDGE.finditer(text):
            for name in m[1].split(","):
                base = name.split(" as ")[0].strip()
                if base and importlib.util.find_spec(f"pouta.edge.{base}") is None:
                    stale.append(f"{path.relative_to(ROOT)}: from pouta.edge import {base}")
    assert not stale, "\n".join(stale)


def _edge_imports(path: Path) -> set[str]:
    """The pouta.edge modules a module imports (relative imports resolved), lazy ones included."""
    package = ["pouta", "edge", *path.parent.relative_to(EDGE).parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            out.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pouta.edge"):
            out.add(node.module or "")
    return out


# What a package may import from the rest of pouta.edge: the pipeline's stages depend on
# the contract and on earlier stages, never on the wiring (cli, config, service) or on
# the live view that sits on top of them.
ALLOWED = {
    "contract": ("pouta.edge.contract", "pouta.edge.postprocess"),
    "sources": ("pouta.edge.contract", "pouta.edge.sources", "pouta.edge.postprocess"),
    "backends": ("pouta.edge.contract", "pouta.edge.backends"),
    "sinks": (
        "pouta.edge.contract",
        "pouta.edge.sinks",
        "pouta.edge.postprocess",
        "pouta.edge.sources.protocol",
        "pouta.edge.backends.protocol",
        "pouta.edge.auth",
    ),
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_pipeline_stages_import_only_what_comes_before_them(package: str) -> None:
    wrong = []
    for path in (EDGE / package).glob("*.py"):
        for name in _edge_imports(path):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[package]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
