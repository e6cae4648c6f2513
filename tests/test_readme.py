"""The README is the front door: short, linking every docs page, and naming every file of the layout it shows
(the commands of the README and the docs are checked in test_documented_commands.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 155, "the README is a front door: move the detail to a docs/ page"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_docs_page_is_linked_from_the_readme(page):
    assert f"](docs/{page}" in README, f"docs/{page} is not linked from the README"


LAYOUT_DIRS = ["tokenclean", "rules", "configs", "benchmarks", "scripts", "tests"]
SKIP = {"__init__.py", "__pycache__"}


@pytest.mark.parametrize("entry", [f"{d}/{p.name}" for d in LAYOUT_DIRS for p in sorted((ROOT / d).iterdir())
                                   if p.name not in SKIP and not p.name.startswith(".")])
def test_the_layout_names_every_module(entry):
    """Each file or folder directly under the layout's folders is named in the README (a new module, or a
    moved one, shows up in the front door's map)."""
    name = entry.split("/", 1)[1]
    assert re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", README), f"the README's layout does not name {entry}"
