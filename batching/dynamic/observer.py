"""Metric hooks of the batch collector; the service implements them with Prometheus."""

from __future__ import annotations

from typing import Literal, Protocol

RejectReason = Literal["queue_full", "timeout", "invalid"]


class CollectorObserver(Protocol):
    """Metric hooks (the service maps them to Prometheus); called on the event loop thread."""

    def observe_batch_size(self, size: int) -> None:
        """A batch of `size` live items starts computing (predict_batch_size)."""

    def observe_queue_wait_seconds(self, seconds: float, priority: int) -> None:
        """An item waited this long from submit() to batch start (predict_queue_wait_seconds)."""

    def observe_inference_seconds(self, seconds: float) -> None:
        """A batch spent this long in run_batch, re-runs included (predict_inference_seconds)."""

    def count_rejected(self, reason: RejectReason, priority: int) -> None:
        """An item got no result: queue_full, timeout, invalid (predict_requests_rejected_total)."""


class NoopObserver:
    """The default observer: records nothing."""

    def observe_batch_size(self, size: int) -> None:
        pass

    def observe_queue_wait_seconds(self, seconds: float, priority: int) -> None:
        pass

    def observe_inference_seconds(self, seconds: float) -> None:
        pass

    def count_rejected(self, reason: RejectReason, priority: int) -> None:
        pass
