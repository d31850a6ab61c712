"""The repository ships reports, not lab benches; the docs agree with the code and reports."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"


def test_reports_hold_no_scripts_or_patches() -> None:
    assert REPORTS.is_dir()
    found = sorted(
        str(p.relative_to(ROOT)) for p in REPORTS.rglob("*") if p.suffix in (".py", ".sh", ".patch")
    )
    assert found == [], f"probe scripts belong in pouta-bench sections (with tests), not in reports: {found}"
