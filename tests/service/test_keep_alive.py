"""The app keeps idle connections open longer than any proxy in front of it does, so a proxy
never sends a request on a connection that uvicorn is closing at that moment."""

from __future__ import annotations

import http.client
import re
import time

from service.__main__ import uvicorn_config
from service.app import create_app
from service.settings import Settings
from tests.conftest import REPO

UVICORN_DEFAULT_KEEP_ALIVE_S = 5
NGINX_DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT_S = 60  # when an upstream block sets no timeout


def upstream_idle_timeouts_s() -> list[int]:
    """keepalive_timeout of every upstream block in nginx/ that keeps connections."""
    timeouts = []
    for conf in (REPO / "nginx").glob("*.conf"):
        for block in re.findall(r"upstream \w+ \{(.*?)\}", conf.read_text(), re.DOTALL):
            if not re.search(r"^\s*keepalive \d+;", block, re.MULTILINE):
                continue
            found = re.search(r"^\s*keepalive_timeout (\d+)s;", block, re.MULTILINE)
            timeouts.append(
                int(found.group(1)) if found else NGINX_DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT_S
            )
    return timeouts


def test_the_app_keeps_idle_connections_longer_than_every_shipped_proxy():
    timeouts = upstream_idle_timeouts_s()
    assert timeouts, "no upstream keepalive found in nginx/"
    settings = Settings()
    assert settings.keep_alive_timeout_s > max(timeouts)
    config = uvicorn_config(create_app(settings), settings)
    assert config.timeout_keep_alive == settings.keep_alive_timeout_s


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(start_server, demo_models):
    server = start_server(PREDICT_MODEL=str(demo_models["classifier"]))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read()
        socket_before = connection.sock
        time.sleep(UVICORN_DEFAULT_KEEP_ALIVE_S + 1)  # idle, as an NGINX pool connection is
        connection.request(
            "POST",
            "/predict",
            body='{"text": "still there?"}',
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert connection.sock is socket_before  # the same connection, not a reconnect
    finally:
        connection.close()
