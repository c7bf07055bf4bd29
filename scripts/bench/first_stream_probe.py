"""`python -m service`, with timestamps for bench_first_stream.py (measurement only).

Writes JSON lines to $FIRST_STREAM_PROBE_LOG: `flush` when the engine thread hands a step's
tokens to the event loop, `send` when a /generate response body leaves the app, `gc` for each
garbage collection of 10 ms or more (every thread waits for one). Run with the tree under test
on PYTHONPATH; nothing here changes what the service does.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from typing import Any

import batching.generation.handle as handle
import service.__main__ as entry
from service.app import create_app

LOG = open(os.environ["FIRST_STREAM_PROBE_LOG"], "a", buffering=1)  # noqa: SIM115
LOCK = threading.Lock()
GC_REPORTED_S = 0.010


def emit(kind: str, **fields: Any) -> None:
    with LOCK:
        LOG.write(json.dumps({"t": time.time(), "kind": kind} | fields) + "\n")


def on_gc(phase: str, info: dict[str, int], started: list[float] = [0.0]) -> None:  # noqa: B006
    if phase == "start":
        started[0] = time.perf_counter()
    elif (elapsed_s := time.perf_counter() - started[0]) >= GC_REPORTED_S:
        emit("gc", generation=info["generation"], ms=elapsed_s * 1000)


original_flush = handle.Outbox.flush


def flush(self: handle.Outbox) -> None:
    if self._items:
        emit("flush")
    original_flush(self)


def probed_app(settings: Any = None) -> Any:
    app = create_app(settings)

    class SendTimes:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["path"] != "/generate":
                return await self.inner(scope, receive, send)
            emit("request")

            async def timed(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    emit("send")

            await self.inner(scope, receive, timed)

    app.add_middleware(SendTimes)
    return app


if __name__ == "__main__":
    gc.callbacks.append(on_gc)
    handle.Outbox.flush = flush  # type: ignore[method-assign]
    entry.create_app = probed_app
    sys.exit(entry.main())
