"""batching/ is the engine room: no web framework or pydantic may leak into it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BATCHING = Path(__file__).resolve().parents[2] / "batching"
FORBIDDEN = {"fastapi", "starlette", "pydantic", "pydantic_settings"}


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(BATCHING.glob("**/*.py")), ids=lambda p: p.name)
def test_no_batching_module_imports_http_or_pydantic(path: Path) -> None:
    assert not imported_top_level_names(path) & FORBIDDEN


def test_the_check_sees_the_engine_modules() -> None:
    names = {p.name for p in BATCHING.glob("**/*.py")}
    assert {"engine.py", "kv_cache.py", "scheduler.py", "running_batch.py"} <= names
