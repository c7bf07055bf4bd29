"""Print the README's "Supported models" table from scripts/model_families.py, or check it.

    python scripts/supported_models.py            print the table
    python scripts/supported_models.py --write    replace the table in README.md
    python scripts/supported_models.py --check    exit 1 if README.md's table is not this one

The table sits between the two markers below; tests/scripts/test_supported_models.py runs the
check, so the README claims exactly what tests/batching/test_model_coverage.py proves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_families import readme_table

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- supported-models:start (python scripts/supported_models.py --write) -->\n"
END = "<!-- supported-models:end -->"


def readme_block(text: str) -> str:
    """The table currently in the README (between the markers)."""
    return text[text.index(START) + len(START) : text.index(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true")
    action.add_argument("--check", action="store_true")
    args = parser.parse_args()
    table = readme_table()
    if not (args.write or args.check):
        print(table, end="")
        return 0
    text = README.read_text()
    if args.check:
        if readme_block(text) != table:
            print("README.md's supported-models table is stale: run "
                  "python scripts/supported_models.py --write")  # fmt: skip
            return 1
        return 0
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + table + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
