"""When a batch that could start now should wait for more items first (see collector.py).

Plain Python, fed by the collector task with arrival times and batch durations.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque

GAP_WINDOW = 8  # inter-arrival gaps remembered: enough for a median, short enough to follow load
DURATION_WEIGHT = 0.25  # share of the newest batch in the running mean of batch durations


class BatchPacer:
    """Waiting pays only when requests arrive faster than batches complete.

    A batch waits for more items only if the median gap between recent arrivals is shorter
    than a recent batch's duration: then more than one request is expected while a batch
    computes, and an item that arrives just after a batch started would have to wait for it
    to finish anyway. Otherwise (light or sporadic traffic, or no history yet) the batch
    should start at once: nobody is coming soon enough to be worth the delay.
    """

    def __init__(self) -> None:
        self._arrivals_s: deque[float] = deque(maxlen=GAP_WINDOW + 1)
        self._batch_duration_s: float | None = None

    def on_arrival(self, now_s: float) -> None:
        self._arrivals_s.append(now_s)

    def on_batch_done(self, duration_s: float) -> None:
        previous = self._batch_duration_s
        self._batch_duration_s = (
            duration_s if previous is None else previous + DURATION_WEIGHT * (duration_s - previous)
        )

    @property
    def median_gap_s(self) -> float | None:
        """Median of the recent inter-arrival gaps (None before two arrivals)."""
        times = list(self._arrivals_s)
        if len(times) < 2:
            return None
        return statistics.median(b - a for a, b in itertools.pairwise(times))

    @property
    def batch_duration_s(self) -> float | None:
        """Running mean of recent batch durations (None before the first batch)."""
        return self._batch_duration_s

    def worth_waiting(self) -> bool:
        gap_s, duration_s = self.median_gap_s, self._batch_duration_s
        return gap_s is not None and duration_s is not None and gap_s < duration_s
