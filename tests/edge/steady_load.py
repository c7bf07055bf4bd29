"""A steady load of /predict and streamed /generate through NGINX, for the restart, kill and
blue-green tests, and what NGINX's access log says about each request.

The load runs on its own thread and event loop, so that a test can stop, kill and start
processes meanwhile. Each client sends one request after another, alternating the two
routes, with an id of its own; every outcome is kept, complete or not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

WAIT_S = 60.0  # bound on every wait for the load to show something


@dataclass
class Outcome:
    request_id: str
    path: str
    started_s: float  # time.monotonic()
    status: int | None = None  # None: the connection broke before a status
    complete: bool = False  # a 200 with the whole answer (for a stream: a finish, then [DONE])
    upstream: str = ""  # X-Upstream: the group that served it
    error: str = ""
    body: str = ""


def stream_is_complete(events: list[str]) -> bool:
    if len(events) < 2 or events[-1] != "[DONE]":
        return False
    final = json.loads(events[-2])
    return "error" not in final and final.get("finish_reason") in {"eos", "stop", "length"}


class SteadyLoad:
    def __init__(self, url: str, clients: int = 4, max_new_tokens: int = 24) -> None:
        self.url = url
        self.clients = clients
        self.max_new_tokens = max_new_tokens
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the load did not stop"

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_for(self, what: str, done: Callable[[list[Outcome]], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done(self.snapshot()):
            assert time.monotonic() < deadline, f"no {what} after {WAIT_S:g}s"
            time.sleep(0.05)

    def wait_for_completions(self, count: int, since_s: float = 0.0) -> None:
        self.wait_for(
            f"{count} complete answers",
            lambda seen: sum(o.complete and o.started_s >= since_s for o in seen) >= count,
        )

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        sent = 0
        while not self._stopping.is_set():
            path = "/predict" if sent % 2 == 0 else "/generate"
            outcome = Outcome(f"load-{index}-{sent}", path, time.monotonic())
            try:
                await (self._predict if path == "/predict" else self._generate)(client, outcome)
            except httpx.HTTPError as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(outcome)
            sent += 1

    async def _predict(self, client: httpx.AsyncClient, outcome: Outcome) -> None:
        headers = {"X-Request-ID": outcome.request_id}
        response = await client.post("/predict", json={"text": "steady"}, headers=headers)
        outcome.status, outcome.body = response.status_code, response.text
        outcome.upstream = response.headers.get("X-Upstream", "")
        outcome.complete = response.status_code == 200 and "label" in response.json()

    async def _generate(self, client: httpx.AsyncClient, outcome: Outcome) -> None:
        body = {"prompt": "steady", "max_new_tokens": self.max_new_tokens, "stream": True}
        headers = {"X-Request-ID": outcome.request_id}
        async with client.stream("POST", "/generate", json=body, headers=headers) as response:
            outcome.status = response.status_code
            outcome.upstream = response.headers.get("X-Upstream", "")
            if response.status_code != 200:  # an error is JSON, not a stream
                outcome.body = (await response.aread()).decode()
                return
            events = [
                line.removeprefix("data: ")
                async for line in response.aiter_lines()
                if line.startswith("data: ")
            ]
        outcome.body = "\n".join(events[-2:])
        outcome.complete = response.status_code == 200 and stream_is_complete(events)


# --- NGINX's side: the access log (nginx/edge.conf's JSON `edge` format) ----------------------


@dataclass
class Attempts:
    """One client request as NGINX logged it: every upstream it tried, and their answers."""

    request_id: str
    status: int
    upstream_addrs: list[str]
    upstream_statuses: list[str]

    @property
    def answered_by(self) -> list[str]:
        """The replicas that answered 200: the ones that did the work."""
        pairs = zip(self.upstream_addrs, self.upstream_statuses, strict=False)
        return [addr for addr, status in pairs if status == "200"]


def split_upstreams(value: str) -> list[str]:
    # NGINX joins the servers of one pass with ", " and passes after an error_page with " : ".
    return [part.strip() for part in value.replace(" : ", ", ").split(",") if part.strip()]


def access_log(log_path: Path) -> dict[str, Attempts]:
    """request id -> what NGINX did with it (JSON lines only: the rest is its error log)."""
    logged = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith('{"time"'):
            continue
        entry = json.loads(line)
        logged[entry["request_id"]] = Attempts(
            entry["request_id"],
            int(entry["status"]),
            split_upstreams(entry["upstream_addr"]),
            split_upstreams(entry["upstream_status"]),
        )
    return logged
