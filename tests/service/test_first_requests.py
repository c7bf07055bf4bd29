"""The first requests after start-up find the process ready: no module is imported and no
template compiled while they are served, and no start-up heap is left for the garbage
collector to walk.

An import runs on the thread that needs it while holding the GIL, so one on the event loop
after a stream's first token stops every delivery until it is done. The first streamed
response used to import anyio's asyncio backend (Starlette opens a task group per stream):
on a busy machine that paused the stream ~0.2 s after its first event, then its tokens came
in a burst. Python's own import log (PYTHONPROFILEIMPORTTIME) shows such an import whatever
the machine's speed.
"""

from __future__ import annotations

import gc

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready

IMPORT_LOG_PREFIX = "import time:"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def imports_logged(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(IMPORT_LOG_PREFIX)]


def test_the_first_streams_after_start_up_import_no_module(start_server, demo_models) -> None:
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS="2",
        GENERATE_MAX_SEQ_LEN="128",
        PYTHONPROFILEIMPORTTIME="1",
    )
    start_up = server.log()
    assert imports_logged(start_up), "the import log is off: this test would prove nothing"
    firsts = [
        ("/generate", {"prompt": "hello", "max_new_tokens": 4, "stream": True}),
        ("/v1/chat/completions", CHAT | {"stream": True}),
        ("/v1/completions", {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True}),
        ("/generate", {"prompt": "hello", "max_new_tokens": 4}),
        ("/predict", {"text": "hello"}),
    ]
    for path, body in firsts:
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as answer:
            assert answer.status_code == 200, answer.read()
            assert answer.read()
    assert imports_logged(server.log()[len(start_up) :]) == []


def test_the_start_up_heap_is_out_of_the_garbage_collectors_reach(demo_models) -> None:
    """A full collection walks every object it tracks while every thread waits: over the
    start-up heap (torch, transformers, the models) that took ~0.4 s, a few seconds into
    serving. Start-up freezes that heap, so the collector tracks only what serving made."""
    settings = Settings(
        predict_model=str(demo_models["classifier"]), generate_model=str(demo_models["llm"])
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        tracked = sum(len(gc.get_objects(generation)) for generation in range(3))
        assert gc.get_freeze_count() > 10 * tracked, (gc.get_freeze_count(), tracked)
