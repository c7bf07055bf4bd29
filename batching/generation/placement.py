"""Admitted requests into batch rows: each gets the next free row, and its longest cached
prefix is mapped into its block table (shared blocks, no copy), so only the rest of its prompt
is prefilled. Followers (choices 2..n of one prompt) get their rows after every leader, so the
leaders' rows stay contiguous for one batched prefill; the followers share their leader's
prompt blocks once it is prefilled."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from batching.errors import EngineError, ModelExecutionError
from batching.generation.block_manager import BlockManager
from batching.generation.detokenizer import Tokenizer
from batching.generation.observer import EngineObserver
from batching.generation.outbox import Outbox
from batching.generation.request import Request
from batching.generation.slots import SlotTable

logger = logging.getLogger(__name__)


class Placement:
    def __init__(
        self,
        slots: SlotTable[Request],
        outbox: Outbox,
        observer: EngineObserver,
        release: Callable[[Request], None],
        *,
        tokenizer: Tokenizer,
        special_tokens: tuple[str, ...],
        grammar_tokenizer: object,
        blocks: BlockManager,
    ) -> None:
        self._slots = slots
        self._outbox = outbox
        self._observer = observer
        self._release = release
        self._tokenizer = tokenizer  # the engine thread's own copy
        self._special_tokens = special_tokens
        self._grammar_tokenizer = grammar_tokenizer
        self._blocks = blocks

    def place(self, leaders: list[Request]) -> list[Request]:
        """The leaders that got a row, in row order. One that cannot be set up fails alone,
        with its followers, at once (it left the queue: nobody else would answer it)."""
        placed = [leader for leader in leaders if self._place_one(leader, with_prefix=True)]
        for leader in leaders:
            for follower in leader.followers:
                if leader in placed:
                    self._place_one(follower, with_prefix=False)
                else:
                    self._fail(follower, leader.error)
        return placed

    def _place_one(self, request: Request, *, with_prefix: bool) -> bool:
        try:
            if not request.started:  # a preempted request keeps its detokenizer and grammar
                request.admit(
                    self._tokenizer,
                    self._special_tokens,
                    time.perf_counter(),
                    self._grammar_tokenizer,
                )
            row = self._slots.allocate(request)
            if with_prefix:
                self._map_cached_prefix(request, row)
        except Exception as exc:
            logger.exception("admission failed (request_id=%s)", request.handle.request_id)
            self._release(request)
            self._fail(request, model_error(exc))
            return False
        return True

    def _map_cached_prefix(self, request: Request, row: int) -> None:
        if request.prefill_alone:
            return  # (prompt logprobs need every position's logits: nothing can be skipped)
        tokens = request.prefill_ids
        # At least the last token is prefilled: its logits give the next token.
        request.blocks = self._blocks.match(tokens, len(tokens) - 1, request.cache_namespace)
        hit = len(request.blocks) * self._blocks.block_size
        if hit:
            self._slots.advance(row, hit)
            request.prefilled = hit
        if not request.started:
            request.cached_tokens = hit
            if self._blocks.prefix_caching:
                self._observer.on_prefix_cache_query(request.prompt_tokens, hit)

    def _fail(self, request: Request, error: EngineError | None) -> None:
        request.error = error or ModelExecutionError("the request could not be admitted")
        self._outbox.fail(request, request.error)


def model_error(cause: Exception) -> ModelExecutionError:
    """A ModelExecutionError chained to the model's own exception (its text stays in logs)."""
    error = ModelExecutionError(f"the model failed: {cause!r}")
    error.__cause__ = cause
    return error
