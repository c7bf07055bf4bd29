"""The README's "Supported models" table is the one printed from the coverage test's list."""

from __future__ import annotations

from model_families import FAMILIES, readme_table
from supported_models import README, readme_block


def test_the_readme_table_is_generated_from_the_family_list() -> None:
    assert readme_block(README.read_text()) == readme_table()


def test_every_family_has_one_row() -> None:
    rows = readme_table().splitlines()[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[: len(FAMILIES)]] == [
        family.name for family in FAMILIES
    ]
