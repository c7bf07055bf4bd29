"""Request priority, shared by both engines: lower is served sooner (vLLM's meaning).

Both queues order waiting requests by (effective priority, arrival). The effective priority
improves by one for every `aging_s` seconds a request has waited, so a low-priority request
still runs under sustained high-priority load: a priority-10 request that has waited 10 x
aging_s competes like a fresh priority-0 one. Nothing running is ever preempted.
"""

from __future__ import annotations

PRIORITY_MIN, PRIORITY_MAX = -100, 100  # the range a request may ask for
DEFAULT_AGING_S = 5.0


def urgency(priority: int, arrival_s: float, now_s: float, aging_s: float) -> tuple[float, float]:
    """Sort key: smaller is served first."""
    return priority - max(0.0, now_s - arrival_s) / aging_s, arrival_s
