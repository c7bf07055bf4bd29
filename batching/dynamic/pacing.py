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

    The rule: a batch that could start now waits for more items only if the median gap
    between recent arrivals is shorter than half a recent batch's duration T.

    Why half: take a batch that starts now, taking T, and a request that arrives t later.
    Started now, that request waits T - t for the worker and then T for its own batch: the two
    finish after T and 2T - t, in total 3T - t. Had the batch waited t for it, both finish
    after t + T, in total 2t + 2T (if a batch of two costs about what a batch of one does, as
    on a GPU). Waiting wins when t < T/2. Where a bigger batch costs more (on a CPU, compute
    grows with the batch), it wins even less often, so with sporadic traffic a batch never
    waits: a request that finds the model idle starts at once. The median ignores one pair of
    requests that happened to arrive together. No history yet (no batch done, or fewer than
    two arrivals) means no wait. Measured in BENCHMARKS.md against never waiting and against
    waiting whenever gap < T: on the 2-core CPU all three are within noise of each other, and
    of the naive server at concurrency 1.
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
        return gap_s is not None and duration_s is not None and gap_s < duration_s / 2
