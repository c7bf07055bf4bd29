"""Canary and shadow rollouts through real NGINX, with stand-in upstreams that record requests.

The split and the mirroring are NGINX's behaviour, not the model's, so stand-ins (which
answer with their own name) make these tests fast and exact.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest
from harness import free_port

from tests.edge.processes import NGINX_DIR, Nginx, Upstream, needs_nginx

pytestmark = needs_nginx

CANARY_REQUESTS = 1000  # binomial sd at 10% is ~1 point: +-4 points is 4 sd
# The test is about the split, not the limit: let every request through.
NO_RATE_LIMIT = {"rate=20r/s": "rate=100000r/s"}


def configured_canary_share() -> float:
    conf = (NGINX_DIR / "nginx.canary.conf").read_text()
    match = re.search(r"^\s*(\d+(?:\.\d+)?)%\s+canary;", conf, re.MULTILINE)
    assert match, "nginx.canary.conf has no `N% canary;` line in split_clients"
    return float(match.group(1)) / 100


def closed_address() -> str:
    """A loopback address where nothing listens (connection refused at once)."""
    return f"127.0.0.1:{free_port()}"


def test_canary_receives_its_configured_share(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    stable, canary = standin("stable"), standin("canary")
    edge = nginx(
        "nginx.canary.conf",
        {"app:8000": stable.address, "app-canary:8000": canary.address},
        NO_RATE_LIMIT,
    )
    served_by: list[str] = []
    with httpx.Client(base_url=edge.url) as client:
        for i in range(CANARY_REQUESTS):
            response = client.post("/predict", json={"text": f"request {i}"})
            assert response.status_code == 200
            # The header names the group NGINX chose; the body, the process that answered.
            assert response.headers["X-Upstream"] == response.json()["upstream"]
            served_by.append(response.headers["X-Upstream"])

    share = served_by.count("canary") / CANARY_REQUESTS
    expected = configured_canary_share()
    assert abs(share - expected) <= 0.04, f"canary share {share:.3f}, configured {expected}"
    assert len(canary.requests()) == served_by.count("canary")
    assert len(stable.requests()) == served_by.count("stable")


def test_a_down_canary_falls_back_to_stable(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    stable = standin("stable")
    edge = nginx(
        "nginx.canary.conf",
        {"app:8000": stable.address, "app-canary:8000": closed_address()},
        NO_RATE_LIMIT,
    )
    with httpx.Client(base_url=edge.url) as client:
        responses = [client.post("/predict", json={"text": str(i)}) for i in range(100)]
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["upstream"] for r in responses} == {"stable"}
    assert any(r.headers["X-Upstream"] == "canary" for r in responses)  # the canary's draws


def wait_for_count(upstream: Upstream, count: int, timeout_s: float = 10.0) -> list[dict[str, str]]:
    """The mirror runs beside the client's request: give the copies a bounded time to land."""
    deadline = time.monotonic() + timeout_s
    while len(upstream.requests()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return upstream.requests()


def send_distinct_requests(url: str, count: int) -> tuple[list[httpx.Response], list[float]]:
    """`count` requests with distinct bodies and ids; the responses and each one's latency."""
    responses, latencies_s = [], []
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(count):
            start = time.perf_counter()
            response = client.post(
                "/predict", json={"text": f"shadowed {i}"}, headers={"X-Request-ID": f"shadow-{i}"}
            )
            latencies_s.append(time.perf_counter() - start)
            responses.append(response)
    return responses, latencies_s


def test_shadow_receives_every_request_and_clients_see_only_primary(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    primary, shadow = standin("stable"), standin("shadow")
    edge = nginx(
        "nginx.shadow.conf",
        {"app:8000": primary.address, "app-shadow:8000": shadow.address},
        NO_RATE_LIMIT,
    )
    responses, _ = send_distinct_requests(edge.url, 40)

    assert all(r.status_code == 200 and r.json()["upstream"] == "stable" for r in responses)
    copies = wait_for_count(shadow, 40)
    assert len(copies) == 40
    # The same requests, bodies and ids included (mirror_request_body on).
    assert sorted(c["request_id"] for c in copies) == sorted(f"shadow-{i}" for i in range(40))
    assert {c["body"] for c in copies} == {r["body"] for r in primary.requests()}
    assert all(c["path"] == "/predict" for c in copies)


@pytest.mark.parametrize("failure", ["returns-500", "down", "slow"])
def test_a_failing_shadow_does_not_affect_clients(
    failure: str, standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    primary = standin("stable")
    if failure == "returns-500":
        shadow_address = standin("shadow", status=500).address
    elif failure == "slow":
        shadow_address = standin("shadow", delay_s=3.0).address
    else:
        shadow_address = closed_address()
    edge = nginx(
        "nginx.shadow.conf",
        {"app:8000": primary.address, "app-shadow:8000": shadow_address},
        NO_RATE_LIMIT,
    )
    responses, latencies_s = send_distinct_requests(edge.url, 10)

    assert [r.status_code for r in responses] == [200] * 10
    assert {r.json()["upstream"] for r in responses} == {"stable"}
    # Not even the next request on the same client waits for the shadow (keepalive_timeout 0).
    assert max(latencies_s) < 1.0, f"latencies {latencies_s}"
