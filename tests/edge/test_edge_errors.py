"""NGINX's own failures (upstream down, upstream too slow) are JSON like the app's, with an id."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
from harness import free_port

from tests.edge.processes import Nginx, Upstream, needs_nginx

pytestmark = needs_nginx

NGINX_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id


def test_upstream_down_gives_502_json(nginx: Callable[..., Nginx]) -> None:
    edge = nginx("nginx.conf", {"app:8000": f"127.0.0.1:{free_port()}"})
    response = httpx.post(
        edge.url + "/predict", json={"text": "hi"}, headers={"X-Request-ID": "down-1"}
    )
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "type": "bad_gateway",
            "message": "the model server is unreachable",
            "request_id": "down-1",
        }
    }
    assert response.headers["X-Request-ID"] == "down-1"


def test_upstream_slower_than_the_read_timeout_gives_504_json(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    slow = standin("slow", delay_s=3.0)
    edge = nginx(
        "nginx.conf",
        {"app:8000": slow.address},
        {"proxy_read_timeout    60s;": "proxy_read_timeout    1s;"},  # not 60 s in a test
    )
    response = httpx.post(edge.url + "/predict", json={"text": "hi"}, timeout=10)
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["type"] == "timeout"
    assert error["request_id"] == response.headers["X-Request-ID"]


def test_an_unsafe_client_request_id_is_replaced(
    standin: Callable[..., Upstream], nginx: Callable[..., Nginx]
) -> None:
    app = standin("stable")
    edge = nginx("nginx.conf", {"app:8000": app.address})
    response = httpx.post(
        edge.url + "/predict", json={"text": "hi"}, headers={"X-Request-ID": 'x", "evil": "1'}
    )
    assert response.status_code == 200
    [seen] = app.requests()
    # The app receives nginx's own id, and the client gets the same one back.
    assert NGINX_ID.match(seen["request_id"])
    assert response.headers["X-Request-ID"] == seen["request_id"]
    assert response.headers.get_list("X-Request-ID") == [seen["request_id"]]


def test_nginx_own_400_is_json(nginx: Callable[..., Nginx]) -> None:
    import socket

    edge = nginx("nginx.conf", {"app:8000": f"127.0.0.1:{free_port()}"})
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bad host name\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head
    assert b'"type":"bad_request"' in body
