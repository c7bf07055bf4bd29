"""The engine's map stays true: every file of batching/generation/ is named in the README's
Layout and in the package's reading order, and nothing named there is gone."""

from __future__ import annotations

import re
from pathlib import Path

import batching.generation

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "batching" / "generation"


def engine_files() -> set[str]:
    return {path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}


def readme_layout_entry() -> str:
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    start = layout.index("batching/generation/")
    end = layout.index("\nscripts/", start)
    return layout[start:end]


def named_files(text: str) -> set[str]:
    return set(re.findall(r"\b([a-z_]+\.py)\b", text))


def test_readme_layout_names_every_engine_file_and_no_missing_one():
    assert named_files(readme_layout_entry()) == engine_files()


def test_package_reading_order_names_every_engine_file_and_no_missing_one():
    assert named_files(batching.generation.__doc__ or "") == engine_files()
