"""Reading a live server's /metrics from tests."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

POLL_S = 0.02


def metric(text: str, name: str) -> float:
    """The value of one unlabelled (or fully spelled-out labelled) sample."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


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
