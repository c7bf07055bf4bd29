"""Run the real app in-process (TestClient runs the lifespan) and wait for readiness."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

READY_TIMEOUT_S = 60


def wait_ready(client: TestClient, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        if runtime.fatal_error:
            raise RuntimeError(runtime.fatal_error)
        time.sleep(0.05)
    raise TimeoutError("app not ready")
