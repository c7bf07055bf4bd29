"""Two real app processes behind real NGINX under a steady load of /predict and streamed
/generate: restarting a replica loses nothing, killing one fails only what it had in flight,
and a blue-green switch (and back) drops nothing.

The two replicas live for the whole module and each test leaves both running and ready.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import HttpServer, free_port, start_service

from tests.edge.processes import REPO, STARTUP_TIMEOUT_S, Nginx, needs_nginx
from tests.edge.steady_load import Outcome, SteadyLoad, access_log

pytestmark = needs_nginx

DRAIN_TIMEOUT_S = 20
# The load is the test's own: NGINX's per-IP limits (one client IP here) would refuse it.
NO_RATE_LIMITS = {"rate=20r/s": "rate=100000r/s", "rate=5r/s": "rate=100000r/s"}
SWITCH_SCRIPT = REPO / "scripts" / "switch_color.py"


class Replica:
    """One app process on a fixed port, so that it can be restarted behind NGINX."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.env, self.workdir = name, env, workdir
        self.port = free_port()
        self.starts = 0
        self.server: HttpServer | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> HttpServer:
        assert self.server is not None
        return self.server

    def start(self) -> None:
        """Start it (again: the previous process has exited, or is stopped now)."""
        if self.server is not None:
            self.server.stop()
        self.starts += 1
        log = self.workdir / f"{self.name}.{self.starts}.log"
        self.server = start_service(log, self.env, cwd=self.workdir, port=self.port)

    def wait_ready(self) -> None:
        self.process.wait_ready(STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def replicas(
    demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    workdir = tmp_path_factory.mktemp("replicas")
    env = {
        "PREDICT_MODEL": str(demo_models["classifier"]),
        "GENERATE_MODEL": str(demo_models["llm"]),
        "DEVICE": "cpu",
        "QUANTIZATION": "none",
        "RATE_LIMIT": "100000/minute",
        "PREDICT_MAX_BATCH_SIZE": "8",
        "GENERATE_SLOTS": "4",
        "GENERATE_MAX_SEQ_LEN": "128",
        "DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
    }
    started = [Replica(name, env, workdir) for name in ("replica-a", "replica-b")]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.process.stop()


def served_by(edge: Nginx, address: str, since_s: float = 0.0) -> Callable[..., bool]:
    """Whether NGINX has logged a 200 from `address` for a request started after since_s."""

    def check(outcomes: list[Outcome]) -> bool:
        logged = access_log(edge.process.log_path)
        later = {o.request_id for o in outcomes if o.started_s >= since_s and o.complete}
        return any(address in logged[i].answered_by for i in later if i in logged)

    return check


def assert_each_request_was_answered_once(edge: Nginx, outcomes: list[Outcome]) -> None:
    logged = access_log(edge.process.log_path)
    for outcome in outcomes:
        attempts = logged[outcome.request_id]
        # Any other attempt was a 503 before work or a connection that never carried it.
        assert len(attempts.answered_by) == 1, attempts


def test_restarting_each_replica_under_load_loses_no_request(
    replicas: list[Replica], nginx: Callable[..., Nginx]
) -> None:
    edge = nginx(
        "nginx.replicas.conf",
        {"app:8000": replicas[0].address, "app-1:8000": replicas[1].address},
        NO_RATE_LIMITS,
    )
    with SteadyLoad(edge.url) as load:
        load.wait_for_completions(10)
        for replica in replicas:
            load.wait_for(f"answers from {replica.name}", served_by(edge, replica.address))
            replica.process.proc.send_signal(signal.SIGTERM)
            assert replica.process.proc.wait(timeout=DRAIN_TIMEOUT_S + 30) == 0  # drained
            assert "draining" in replica.process.log()
            replica.start()
            replica.wait_ready()
            back_at = time.monotonic()
            load.wait_for(
                f"answers from {replica.name} once restarted",
                served_by(edge, replica.address, since_s=back_at),
            )
        load.wait_for_completions(10, since_s=time.monotonic())

    outcomes = load.snapshot()
    failed = [o for o in outcomes if not o.complete]
    assert failed == [], f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    assert {o.path for o in outcomes} == {"/predict", "/generate"}
    assert_each_request_was_answered_once(edge, outcomes)


def test_a_killed_replica_fails_only_its_requests_in_flight(
    replicas: list[Replica], nginx: Callable[..., Nginx]
) -> None:
    edge = nginx(
        "nginx.replicas.conf",
        {"app:8000": replicas[0].address, "app-1:8000": replicas[1].address},
        NO_RATE_LIMITS,
    )
    victim = replicas[0]
    with SteadyLoad(edge.url, max_new_tokens=64) as load:
        load.wait_for_completions(10)
        load.wait_for(f"answers from {victim.name}", served_by(edge, victim.address))
        killed_at = time.monotonic()
        victim.process.signal_group(signal.SIGKILL)
        victim.process.proc.wait(timeout=30)
        gone_at = time.monotonic()  # from here on, its sockets are closed
        load.wait_for_completions(20, since_s=gone_at)
    victim.start()
    victim.wait_ready()

    outcomes = load.snapshot()
    failed = [o for o in outcomes if not o.complete]
    # Those in flight on the victim (none started after it was gone) ...
    assert all(o.started_s < gone_at for o in failed), failed
    for outcome in failed:
        if outcome.status == 200:  # a stream cut after its first events: nothing to report in
            assert outcome.path == "/generate" and outcome.error, outcome
            continue
        # ... were answered with NGINX's JSON error, and none was sent to the other replica.
        assert outcome.status in {502, 503}, outcome
        assert json.loads(outcome.body)["error"]["type"] in {"bad_gateway", "unavailable"}
    logged = access_log(edge.process.log_path)
    survivor = replicas[1].address
    for outcome in failed:
        assert survivor not in logged[outcome.request_id].upstream_addrs, outcome
    assert sum(o.started_s >= killed_at and o.complete for o in outcomes) >= 20


def switch(edge: Nginx, colour: str) -> None:
    """The README's command, pointed at the test's NGINX and apps."""
    args = [sys.executable, str(SWITCH_SCRIPT), colour, "--direct"]
    args += ["--nginx-dir", str(edge.conf_dir), "--wait-s", "30"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"all new requests go to {colour}" in done.stdout


def test_a_blue_green_switch_and_back_under_load_drops_nothing(
    replicas: list[Replica], nginx: Callable[..., Nginx]
) -> None:
    blue, green = replicas
    edge = nginx(
        "nginx.bluegreen.conf",
        {"app:8000": blue.address, "app-green:8000": green.address},
        NO_RATE_LIMITS,
    )
    with SteadyLoad(edge.url) as load:
        load.wait_for_completions(10)
        for colour in ("green", "blue"):
            switch(edge, colour)
            switched_at = time.monotonic()
            load.wait_for(
                f"answers from {colour}",
                lambda seen, c=colour, t=switched_at: (
                    sum(o.upstream == c and o.started_s > t for o in seen) >= 10
                ),
            )

    outcomes = load.snapshot()
    failed = [o for o in outcomes if not o.complete]
    assert failed == [], f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    assert {o.upstream for o in outcomes} == {"blue", "green"}
    assert_each_request_was_answered_once(edge, outcomes)
