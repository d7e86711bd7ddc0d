"""The docs show what the code does: every screenshot docs/mlflow_ui.md shows is one the browser
test takes (``make screenshots`` refreshes them from a real search) and is in the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_ui_walk_through_shows_exactly_the_screenshots_the_browser_test_takes():
    shown = set(re.findall(r"\]\(img/([\w.-]+\.png)\)", (ROOT / "docs" / "mlflow_ui.md").read_text()))
    taken = set(re.findall(r"snap\(page, shots, \"([\w.-]+\.png)\"", (ROOT / "tests" / "search" / "test_ui_browser.py").read_text()))
    assert shown and shown == taken
    missing = sorted(name for name in shown if not (ROOT / "docs" / "img" / name).is_file())
    assert not missing, f"docs/img lacks {missing}: run `make screenshots`"
