"""What NGINX retries on another replica (nginx/edge.conf, routes.conf), with stand-in replicas.

Retried: a 503 (the app sends one only before doing any work) and a request that never
reached a replica. Never retried: a request a replica had (it hung up in the middle, or
answered another error). Each test sends POSTs, which NGINX retries only when told to.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.edge.processes import Nginx, Upstream, needs_nginx
from tests.edge.test_edge_rollouts import NO_RATE_LIMIT, closed_address

pytestmark = needs_nginx
REQUESTS = 6  # sequential: least_conn alternates between idle replicas, so both get some


def replicas(
    nginx: Callable[..., Nginx], first: str, second: Upstream
) -> tuple[Nginx, list[httpx.Response]]:
    """nginx.replicas.conf over two replicas; REQUESTS POSTs, one after another."""
    edge = nginx("nginx.replicas.conf", {"app:8000": first, "app-1:8000": second.address})
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        responses = [
            client.post("/predict", json={"text": str(i)}, headers={"X-Request-ID": f"r-{i}"})
            for i in range(REQUESTS)
        ]
    return edge, responses


@pytest.mark.parametrize("failure", ["answers-503", "refuses-connections"])
def test_a_request_no_replica_worked_on_is_answered_by_another_replica(
    failure: str, standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    healthy = standin("healthy")
    unavailable = standin("draining", status=503) if failure == "answers-503" else None
    first = unavailable.address if unavailable else closed_address()
    _, responses = replicas(nginx, first, healthy)

    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert {r.json()["upstream"] for r in responses} == {"healthy"}
    # Each request reached the healthy replica exactly once, with its body.
    served = [r["request_id"] for r in healthy.requests()]
    assert sorted(served) == sorted(f"r-{i}" for i in range(REQUESTS))
    if unavailable is not None:
        assert unavailable.requests(), "the draining replica was never tried: nothing was retried"


def test_a_request_whose_replica_hung_up_mid_request_is_not_sent_again(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    healthy, dying = standin("healthy"), standin("dying", hang_up=True)
    _, responses = replicas(nginx, dying.address, healthy)

    [lost] = dying.requests()  # it was tried once, then left out of rotation
    failed = [r for r in responses if r.status_code != 200]
    assert [r.headers["X-Request-ID"] for r in failed] == [lost["request_id"]]
    assert failed[0].status_code == 502
    assert failed[0].json()["error"]["type"] == "bad_gateway"
    assert lost["request_id"] not in {r["request_id"] for r in healthy.requests()}
    # Out of rotation after one failure: every later request went to the healthy replica.
    assert len(healthy.requests()) == REQUESTS - 1


@pytest.mark.parametrize("status", [500, 504])
def test_an_error_after_the_work_started_reaches_the_client_unretried(
    status: int, standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    healthy, failing = standin("healthy"), standin("failing", status=status)
    _, responses = replicas(nginx, failing.address, healthy)

    failed = [r for r in responses if r.status_code != 200]
    assert failed and {r.status_code for r in failed} == {status}
    assert {r.json()["upstream"] for r in failed} == {"failing"}  # the replica's own answer
    retried = {r["request_id"] for r in failing.requests()} & {
        r["request_id"] for r in healthy.requests()
    }
    assert retried == set()


def test_a_shadow_that_refuses_its_copy_is_not_retried_on_the_stable_app(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    primary = standin("stable")
    edge = nginx(
        "nginx.shadow.conf",
        {"app:8000": primary.address, "app-shadow:8000": closed_address()},
        NO_RATE_LIMIT,
    )
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        statuses = [client.post("/predict", json={"text": str(i)}).status_code for i in range(5)]
    assert statuses == [200] * 5
    assert len(primary.requests()) == 5  # once each: the refused copies were dropped
