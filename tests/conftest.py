"""Shared fixtures: demo models built once per session, and real server processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# scripts/ holds the helpers shared with the benchmarks (tiny models, process harness,
# /metrics parser); scripts/bench/ the benchmark modules that tests/test_bench.py checks.
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "scripts" / "bench")]

from harness import HttpServer, start_service  # noqa: E402
from make_demo_models import build_demo_models  # noqa: E402

READY_TIMEOUT_S = 120


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skipped test fails the run: CI installs everything the suite needs, so
    a skip there hides a test that did not run. Only tests marked `gpu` may skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true (only @pytest.mark.gpu tests may): {report.longrepr}"
        )


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"classifier": path, "llm": path}: the same demo models ./scripts/serve builds."""
    return build_demo_models(tmp_path_factory.mktemp("demo_models"))


@pytest.fixture(scope="module")
def start_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., HttpServer]]:
    """Factory: start_server(ENV=value, ...) -> a ready `python -m service`, stopped after the
    module."""
    started: list[HttpServer] = []

    def start(wait: bool = True, **env: str) -> HttpServer:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = start_service(log_path, {"LOG_LEVEL": "WARNING"} | env, cwd=REPO)
        started.append(server)
        if wait:
            server.wait_ready(READY_TIMEOUT_S)
        return server

    yield start
    for server in started:
        server.stop()
