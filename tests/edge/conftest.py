"""Fixtures for the edge tests: stand-in upstreams, NGINX, the demo models and the real app.

Tests that need a binary that is not installed (nginx, prometheus) are skipped with the
reason on a developer's machine; CI installs them, and under CI=true a skip fails the run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import ManagedProcess, free_port, port_open, start_service

from tests.edge.processes import (
    NGINX,
    REPO,
    STANDIN,
    STARTUP_TIMEOUT_S,
    App,
    Nginx,
    Upstream,
    render_nginx,
)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """Factory: standin(name, status=200, delay_s=0.0, hang_up=False) starts a stand-in
    upstream."""
    started: list[Upstream] = []

    def start(
        name: str, status: int = 200, delay_s: float = 0.0, hang_up: bool = False
    ) -> Upstream:
        port = free_port()
        requests_log = tmp_path / f"{name}.requests.jsonl"
        args = [sys.executable, str(STANDIN), "--port", str(port), "--name", name]
        args += ["--log", str(requests_log), "--status", str(status), "--delay-s", str(delay_s)]
        args += ["--hang-up"] if hang_up else []
        proc = ManagedProcess(f"standin {name}", args, tmp_path / f"{name}.log")
        upstream = Upstream(name, port, proc, requests_log)
        started.append(upstream)
        proc.wait_until(lambda: port_open(port), 15, "listening")
        return upstream

    yield start
    for upstream in started:
        upstream.process.stop()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Factory: nginx("nginx.canary.conf", {"app:8000": "127.0.0.1:P", ...}, extra=...)."""
    if NGINX is None:
        pytest.skip("nginx not installed (apt-get install nginx)")
    started: list[Nginx] = []

    def start(
        conf_name: str, upstreams: dict[str, str], extra: dict[str, str] | None = None
    ) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        port = free_port()
        conf_dir = render_nginx(prefix, upstreams, port, extra)
        global_directives = f"daemon off; pid {prefix / 'nginx.pid'};"
        args = [NGINX, "-p", str(prefix), "-e", "stderr", "-c", str(conf_dir / conf_name)]
        args += ["-g", global_directives]
        proc = ManagedProcess("nginx", args, prefix / "nginx.log")
        edge = Nginx(f"http://127.0.0.1:{port}", proc, conf_dir)
        started.append(edge)
        proc.wait_until(lambda: port_open(port), 10, "listening")
        return edge

    yield start
    for edge in started:
        edge.process.stop()


# --- The real app ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def app(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One real app process (`python -m service`, as in the image) on a free port, ready."""
    workdir = tmp_path_factory.mktemp("app")  # not the repo: a developer's .env stays out
    env = {
        "PREDICT_MODEL": str(demo_models["classifier"]),
        "GENERATE_MODEL": str(demo_models["llm"]),
        "DEVICE": "cpu",
        "QUANTIZATION": "none",
        "API_KEYS": "",
        "RATE_LIMIT": "100000/minute",  # NGINX's limit is under test, not the app's
        "GENERATE_SLOTS": "4",
        "GENERATE_MAX_SEQ_LEN": "256",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    server = start_service(workdir / "app.log", env, cwd=workdir)
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        yield server
    finally:
        server.stop()
