"""Metric hooks of the generation engine; the service implements them with Prometheus.

All hooks are called on the engine thread, between model steps: keep them cheap and let them
not raise (an exception here would end the engine loop). Gauges (slots in use, waiting
requests, KV-cache usage) are not pushed: read the engine's properties at scrape time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

FinishLabel = Literal["eos", "stop", "length", "cancelled", "error"]
RejectLabel = Literal["queue_full", "timeout"]


class EngineObserver(Protocol):
    """What the engine reports (metric names are the service's, for orientation)."""

    def on_step(self, batch_size: int) -> None:
        """One decode forward ran over `batch_size` sequences (generate_step_batch_size)."""

    def on_first_token(self, ttft_s: float, priority: int) -> None:
        """A request got its first token, ttft_s after submit
        (generate_time_to_first_token_seconds{priority})."""

    def on_rejected(self, reason: RejectLabel, priority: int) -> None:
        """A request was refused: a full queue, or it waited past its timeout
        (generate_requests_rejected_total{reason,priority})."""

    def on_token_gaps(self, gaps_s: Sequence[float]) -> None:
        """Gaps since each decoded row's previous token (generate_inter_token_latency)."""

    def on_prefix_cache_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A prompt was looked up in the prefix cache and `hit_tokens` of it were found
        (generate_prefix_cache_queries_total, generate_prefix_cache_hits_total; in tokens)."""

    def on_prefill_chunks(self, chunks: int) -> None:
        """A prompt was prefilled in `chunks` chunks, more than one (generate_prefill_chunks)."""

    def on_preemption(self) -> None:
        """A running sequence gave its KV blocks back and will be resumed by recomputation
        (generate_preemptions_total)."""

    def on_finish(
        self, reason: FinishLabel, prompt_tokens: int, output_tokens: int, e2e_s: float
    ) -> None:
        """A request ended (generate_requests_finished_total{reason}, generate_e2e_seconds,
        generate_output_tokens, generate_prompt_tokens_total, generate_output_tokens_total).

        "error" covers queue timeouts, model failures and engine shutdown.
        """


class NoopEngineObserver:
    """The default observer: records nothing."""

    def on_step(self, batch_size: int) -> None:
        pass

    def on_first_token(self, ttft_s: float, priority: int) -> None:
        pass

    def on_rejected(self, reason: RejectLabel, priority: int) -> None:
        pass

    def on_token_gaps(self, gaps_s: Sequence[float]) -> None:
        pass

    def on_prefix_cache_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        pass

    def on_prefill_chunks(self, chunks: int) -> None:
        pass

    def on_preemption(self) -> None:
        pass

    def on_finish(
        self, reason: FinishLabel, prompt_tokens: int, output_tokens: int, e2e_s: float
    ) -> None:
        pass
