"""A client cannot pick its own identity through NGINX: NGINX sends the address it saw as
X-Forwarded-For, and the app trusts that header from NGINX alone, so a rotating
X-Forwarded-For neither escapes the app's per-client rate limit nor writes the audit log's
client field."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from harness import start_service

from tests.edge.processes import REPO, STARTUP_TIMEOUT_S, App, Nginx, needs_nginx

pytestmark = needs_nginx

APP_LIMIT_PER_MINUTE = 5


@pytest.fixture(scope="module")
def limited_app(
    demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    """The real app with a small per-client limit and an audit log, trusting NGINX's hop."""
    workdir = tmp_path_factory.mktemp("limited_app")
    env = {
        "PREDICT_MODEL": str(demo_models["classifier"]),
        "GENERATE_MODEL": "",
        "DEVICE": "cpu",
        "API_KEYS": "",
        "RATE_LIMIT": f"{APP_LIMIT_PER_MINUTE}/minute",
        "FORWARDED_ALLOW_IPS": "127.0.0.1",  # NGINX's address here (compose: its fixed one)
        "AUDIT_LOG": str(workdir / "audit.jsonl"),
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


def test_rotating_x_forwarded_for_through_nginx_does_not_escape_the_rate_limit(
    limited_app: App, nginx: Callable[..., Nginx]
) -> None:
    edge = nginx("nginx.conf", {"app:8000": f"127.0.0.1:{limited_app.port}"})
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=edge.url, timeout=60) as client:
        for n in range(12):
            forged = {"X-Forwarded-For": f"10.0.0.{n}", "X-Real-IP": f'1.2.3.{n}"'}
            statuses[client.post("/predict", json={"text": "hi"}, headers=forged).status_code] += 1
    assert statuses == {200: APP_LIMIT_PER_MINUTE, 429: 12 - APP_LIMIT_PER_MINUTE}, statuses
    audit_path = Path(limited_app.log_path).parent / "audit.jsonl"
    clients = {json.loads(line)["client"] for line in audit_path.read_text().splitlines()}
    assert clients == {"ip:127.0.0.1"}  # the address NGINX saw, never a forged one
