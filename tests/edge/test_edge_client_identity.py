"""A client cannot pick its own identity through NGINX: NGINX sends the address it saw as
X-Forwarded-For, and the app trusts that header from NGINX alone, so a rotating
X-Forwarded-For neither escapes the app's per-client rate limit nor writes the audit log's
client field. Behind a proxy that appends to the header instead (an Envoy-based gateway), the
app trusts the one hop that proxy wrote (FORWARDED_TRUSTED_HOPS=1) and nothing the client wrote."""

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


# How an Envoy-based gateway (and NGINX Gateway Fabric) pass the client on: appended to what
# the client sent, where nginx/edge.conf replaces it.
APPENDING_PROXY = {
    "proxy_set_header X-Forwarded-For   $remote_addr;": (
        "proxy_set_header X-Forwarded-For   $proxy_add_x_forwarded_for;"
    )
}


def start_limited_app(
    demo_models: dict[str, Path], workdir: Path, trust: dict[str, str]
) -> Iterator[App]:
    """The real app with a small per-client limit and an audit log, trusting `trust`."""
    env = {
        "PREDICT_MODEL": str(demo_models["classifier"]),
        "GENERATE_MODEL": "",
        "DEVICE": "cpu",
        "API_KEYS": "",
        "RATE_LIMIT": f"{APP_LIMIT_PER_MINUTE}/minute",
        "AUDIT_LOG": str(workdir / "audit.jsonl"),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    } | trust
    server = start_service(workdir / "app.log", env, cwd=workdir)
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def limited_app(
    demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    # NGINX's address here (compose: its fixed one).
    trust = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}
    yield from start_limited_app(demo_models, tmp_path_factory.mktemp("limited_app"), trust)


@pytest.fixture(scope="module")
def gateway_app(
    demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    # As overlays/inference-gateway runs it: any peer may be the proxy, one hop is trusted.
    trust = {"FORWARDED_ALLOW_IPS": "*", "FORWARDED_TRUSTED_HOPS": "1"}
    yield from start_limited_app(demo_models, tmp_path_factory.mktemp("gateway_app"), trust)


def send_forged(edge: Nginx) -> Counter[int]:
    """12 requests, each claiming another client in its own X-Forwarded-For and X-Real-IP."""
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=edge.url, timeout=60) as client:
        for n in range(12):
            forged = {"X-Forwarded-For": f"10.0.0.{n}", "X-Real-IP": f'1.2.3.{n}"'}
            statuses[client.post("/predict", json={"text": "hi"}, headers=forged).status_code] += 1
    return statuses


def audited_clients(app: App) -> set[str]:
    audit_path = Path(app.log_path).parent / "audit.jsonl"
    return {json.loads(line)["client"] for line in audit_path.read_text().splitlines()}


def test_rotating_x_forwarded_for_through_nginx_does_not_escape_the_rate_limit(
    limited_app: App, nginx: Callable[..., Nginx]
) -> None:
    edge = nginx("nginx.conf", {"app:8000": f"127.0.0.1:{limited_app.port}"})
    statuses = send_forged(edge)
    assert statuses == {200: APP_LIMIT_PER_MINUTE, 429: 12 - APP_LIMIT_PER_MINUTE}, statuses
    assert audited_clients(limited_app) == {"ip:127.0.0.1"}  # what NGINX saw, never a forged one


def test_behind_a_proxy_that_appends_the_client_is_the_hop_it_appended(
    gateway_app: App, nginx: Callable[..., Nginx]
) -> None:
    upstream = {"app:8000": f"127.0.0.1:{gateway_app.port}"}
    gateway = nginx("nginx.conf", upstream, extra=APPENDING_PROXY)
    statuses = send_forged(gateway)
    assert statuses == {200: APP_LIMIT_PER_MINUTE, 429: 12 - APP_LIMIT_PER_MINUTE}, statuses
    assert audited_clients(gateway_app) == {"ip:127.0.0.1"}  # the entry the proxy appended
