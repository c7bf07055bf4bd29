"""Fixtures for the edge tests: stand-in upstreams, NGINX, the demo models and the real app.

Tests that need a binary that is not installed (nginx, prometheus) are skipped with the
reason; CI installs them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.edge.processes import (
    NGINX,
    REPO,
    STANDIN,
    STARTUP_TIMEOUT_S,
    App,
    Nginx,
    Upstream,
    free_port,
    http_ok,
    port_open,
    render_nginx,
    spawn,
    wait_until,
)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """Factory: standin(name, status=200, delay_s=0.0) starts a stand-in upstream."""
    started: list[Upstream] = []

    def start(name: str, status: int = 200, delay_s: float = 0.0) -> Upstream:
        port = free_port()
        requests_log = tmp_path / f"{name}.requests.jsonl"
        args = [sys.executable, str(STANDIN), "--port", str(port), "--name", name]
        args += ["--log", str(requests_log), "--status", str(status), "--delay-s", str(delay_s)]
        proc = spawn(f"standin {name}", args, tmp_path / f"{name}.log")
        upstream = Upstream(name, port, proc, requests_log)
        started.append(upstream)
        wait_until(proc, lambda: port_open(port), 15, "listening")
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
        proc = spawn("nginx", [*args, "-g", global_directives], prefix / "nginx.log")
        edge = Nginx(f"http://127.0.0.1:{port}", proc)
        started.append(edge)
        wait_until(proc, lambda: port_open(port), 10, "listening")
        return edge

    yield start
    for edge in started:
        edge.process.stop()


# --- The real app ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny offline demo models, built once per test session."""
    script = REPO / "scripts" / "make_demo_models.py"
    if not script.exists():
        pytest.skip("scripts/make_demo_models.py does not exist yet")
    spec = importlib.util.spec_from_file_location("make_demo_models", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out_dir = tmp_path_factory.mktemp("demo_models")
    paths: dict[str, Path] = module.build_demo_models(out_dir)
    return paths


@pytest.fixture(scope="session")
def app(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One real app process (uvicorn, as in production) on a free port, ready to serve."""
    if not (REPO / "service" / "app.py").exists():
        pytest.skip("service/app.py does not exist yet")
    workdir = tmp_path_factory.mktemp("app")  # not the repo: a developer's .env stays out
    port = free_port()
    env = {
        **os.environ,
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
    }
    args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app"]
    args += ["--app-dir", str(REPO), "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn("app", args, workdir / "app.log", env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(proc, lambda: http_ok(url + "/ready"), STARTUP_TIMEOUT_S, "ready")
        yield App(url, port, proc)
    finally:
        proc.stop()
