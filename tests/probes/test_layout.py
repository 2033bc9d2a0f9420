"""probes/ stays a set of small rooms: no module over 500 lines (issue 23)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500


def test_no_probes_module_is_over_500_lines() -> None:
    modules = sorted((REPO / "probes").rglob("*.py"))
    assert len(modules) > 40, "the walk found the rooms"
    too_long = {str(p.relative_to(REPO)): n for p in modules if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"split these by job: {too_long}"
