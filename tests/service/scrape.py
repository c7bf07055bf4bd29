"""Reading a live server's /metrics from tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from metrics_text import sample_value

POLL_S = 0.02


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics page, parsed as Prometheus text."""
    return sample_value(text, name, **labels)


@contextmanager
def peak_slots_in_use(url: str) -> Iterator[dict[str, float]]:
    """Poll generate_slots_in_use while the block runs; yields {"slots": highest seen}."""
    peak = {"slots": 0.0}
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not done.is_set():
                value = metric(client.get("/metrics").text, "generate_slots_in_use")
                peak["slots"] = max(peak["slots"], value)
                time.sleep(POLL_S)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join()
