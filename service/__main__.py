"""`python -m service`: one uvicorn worker with a graceful drain on SIGTERM.

On the first SIGTERM/SIGINT: /ready turns 503 at once, new work gets 503, requests already
running (streams included) finish for up to DRAIN_TIMEOUT_S, then uvicorn shuts down and
the process exits 0. A second signal stops at once. If a model failed to load, exit 1.

The drain also lasts until no request has arrived for DRAIN_QUIET_S. NGINX learns that a
replica drains from its first 503 and then stops sending it work; shutting down sooner
would close pooled connections that NGINX may be sending a request on at that very moment
(a 502 it must not retry: nginx/edge.conf). Keep it below NGINX's fail_timeout (2 s), after
which NGINX tries the replica again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.forwarded import with_client_address
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger("service")

DRAIN_POLL_S = 0.05
SHUTDOWN_AFTER_DRAIN_S = 3  # uvicorn closes what the drain left open, then the engines stop


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.drain_timeout_s = settings.drain_timeout_s
        self.drain_quiet_s = settings.drain_quiet_s
        self.drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown, and the
        # process would die by SIGTERM instead of exiting 0 after a clean drain.
        runtime: Runtime | None = getattr(self.fastapi_app.state, "runtime", None)
        if self.drain_task is not None:  # a second signal: stop now
            self.force_exit = self.should_exit = True
            return
        if runtime is None or runtime.fatal_error or not runtime.ready:
            self.should_exit = True  # nothing worth draining yet
            return
        runtime.draining = True
        log.info(
            "signal %d: draining (%d in flight, up to %gs)",
            sig,
            runtime.in_flight,
            self.drain_timeout_s,
        )
        self.drain_task = asyncio.get_running_loop().create_task(self._drain(runtime))

    async def _drain(self, runtime: Runtime) -> None:
        started = time.monotonic()
        deadline = started + self.drain_timeout_s

        def busy() -> bool:
            # Quiet since the signal at the earliest: a proxy may be sending one right now.
            quiet_s = time.monotonic() - max(started, runtime.last_request_s)
            return runtime.in_flight > 0 or quiet_s < self.drain_quiet_s

        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        log.info("drain finished with %d still in flight; shutting down", runtime.in_flight)
        if runtime.in_flight and runtime.generate is not None:
            # Generations still running are cut here, by the engine, not by uvicorn closing
            # their connections: each stream then ends with an error event (/generate) or an
            # OpenAI error chunk and [DONE] (/v1), which a client can tell from a network fault.
            await runtime.generate.stop(0.0)
        self.should_exit = True


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Progress bars from weight loading are noise in a server log.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        # uvicorn's own proxy-header rule runs inside with_client_address, after the hop count.
        with_client_address(app, settings.forwarded_allow_ips, settings.forwarded_trusted_hops),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        workers=1,  # one process holds the model; more workers would load more copies
        log_level=settings.log_level.lower(),
        # Our drain (DrainingServer) has already waited DRAIN_TIMEOUT_S for the requests in
        # flight; uvicorn's own graceful wait after it only closes what is left.
        timeout_graceful_shutdown=SHUTDOWN_AFTER_DRAIN_S,
        # uvicorn's default of 5 s is shorter than NGINX's 60 s for idle upstream connections:
        # NGINX could reuse a connection just as uvicorn closes it, and that POST would fail.
        timeout_keep_alive=settings.keep_alive_timeout_s,
        proxy_headers=False,
    )


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app, settings)
    server.run()
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    if runtime is not None and runtime.fatal_error:
        log.critical("exiting: %s", runtime.fatal_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
