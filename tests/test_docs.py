"""The repository ships reports, not lab benches; the docs agree with the code and reports."""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"


def test_reports_hold_no_scripts_or_patches() -> None:
    assert REPORTS.is_dir()
    found = sorted(
        str(p.relative_to(ROOT)) for p in REPORTS.rglob("*") if p.suffix in (".py", ".sh", ".patch")
    )
    assert found == [], f"probe scripts belong in pouta-bench sections (with tests), not in reports: {found}"


# -- the generated pages (docs/generate.py, the MkDocs hook) ----------------------------------

DOCS = ROOT / "docs"
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


@pytest.fixture(scope="module")
def gen() -> Iterator[Any]:
    sys.path.insert(0, str(DOCS))
    try:
        yield importlib.import_module("generate")
    finally:
        sys.path.remove(str(DOCS))


def _leaves(d: dict[str, Any], free_form: frozenset[str], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and name not in free_form:
            out += _leaves(v, free_form, name + ".")
        else:
            out.append(name)
    return out


def test_configuration_reference_lists_every_key_of_every_schema(gen: Any) -> None:
    from pouta.edge.config import run_schema
    from pouta.trainer.train_config import train_schema

    page = gen.render((DOCS / "configuration.md").read_text(encoding="utf-8"))
    sections = dict(re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", page, re.M | re.S))
    for command, schema in (("pouta-edge run", run_schema()), ("pouta-train", train_schema("tiny"))):
        keys = _leaves(schema.defaults, schema.free_form)
        assert len(keys) > 20, command
        missing = [k for k in keys if f"| `{k}` |" not in sections[command]]
        assert missing == [], f"{command}: {missing}"
    for command, module, func in gen.FLAT_COMMANDS:
        parser = gen.command_parser(module, func)
        dests = {a.dest for a in parser._actions} - gen._OWN
        assert dests, command
        missing = [d for d in dests if f"| `{d}` (" not in sections[command]]
        assert missing == [], f"{command}: {missing}"
    # Every key says what it means (a new key without a comment or help text fails here).
    for command, _how, keys in gen.schemas():
        assert [k.name for k in keys if not k.meaning.strip()] == [], command


def _report_numbers(path: Path) -> set[str]:
    """Every number in a report, as written and as the docs format it."""
    text = path.read_text(encoding="utf-8")
    out = set(NUMBER.findall(text))

    def walk(v: Any) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, int | float):
            out.update({f"{v:.3f}", f"{v:.2f}", f"{v:.1f}", f"{v:g}"})
            if float(v).is_integer():
                out.add(str(int(v)))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(json.loads(text))
    return out


def _table_numbers(markdown: str) -> list[str]:
    return [n for line in markdown.splitlines() if line.startswith("|") for n in NUMBER.findall(line)]


def test_every_number_on_the_results_page_is_in_its_report(gen: Any) -> None:
    page = gen.render((DOCS / "results.md").read_text(encoding="utf-8"))
    checked = 0
    for section in re.split(r"^## ", page, flags=re.M)[1:]:
        reports = sorted(set(re.findall(r"benchmarks/reports/[\w./-]+\.json", section)))
        if "/vanilla/quality.json" in section and not any("vanilla" in r for r in reports):
            reports.append("benchmarks/reports/quality-10min-cpu-2core/vanilla/quality.json")
        numbers = _table_numbers(section)
        if not numbers:
            continue
        assert reports, f"a table without its report: {section.splitlines()[0]}"
        known = set().union(*(_report_numbers(ROOT / r) for r in reports))
        assert [n for n in numbers if n not in known] == [], section.splitlines()[0]
        checked += len(numbers)
    assert checked > 50


def test_readme_results_table_comes_from_the_quality_reports(gen: Any) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    numbers = _table_numbers(section)
    assert len(numbers) >= 10
    known = set().union(*(_report_numbers(p) for p in (*gen.QUALITY_REPORTS.values(), gen.SPLIT_REPORT)))
    assert [n for n in numbers if n not in known] == []


def test_readme_extras_table_matches_setup_cfg(gen: Any) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in readme.split("## Install", 1)[1].split("\n## ", 1)[0].splitlines():
        m = re.match(r"^\| (\(none\)|`\[([\w-]+)\]`) \|(.*)$", line)
        if m:
            rows[m.group(2) or "(none)"] = m.group(3)
    extras = gen.extras()
    assert set(rows) == set(extras)
    for extra, packages in extras.items():
        assert [p for p in packages if p not in rows[extra]] == [], extra


def test_generated_markers_all_have_a_generator(gen: Any) -> None:
    used = {m for p in DOCS.glob("*.md") for m in gen.MARKER.findall(p.read_text(encoding="utf-8"))}
    assert used and used <= set(gen.GENERATORS)
    for page in DOCS.glob("*.md"):
        assert not gen.MARKER.search(gen.render(page.read_text(encoding="utf-8"))), page.name
