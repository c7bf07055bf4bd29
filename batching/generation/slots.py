"""Batch rows: which request runs in which row, and how an admitted request gets one.

A row is a place in the decode batch, not memory: GENERATE_SLOTS rows are the most sequences
decoded together, and a row's K/V lives in the blocks of its request's block table
(block_manager.py), wherever they are in the pool. `SlotTable` is the bookkeeping, in plain
Python: active rows are kept packed at 0..in_use-1, so a decode step's batch is rows 0..B-1:
`allocate` takes row `in_use`, and `release` moves the last row into the hole it leaves (only
bookkeeping moves: the K/V stays in its blocks).

`Placement` puts admitted requests into rows: each gets the next free row, and its longest
cached prefix is mapped into its block table (shared blocks, no copy), so only the rest of its
prompt is prefilled. Followers (choices 2..n of one prompt) get their rows after every leader,
so the leaders' rows stay contiguous for one batched prefill; the followers share their
leader's prompt blocks once it is prefilled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from batching.errors import EngineError, ModelExecutionError
from batching.generation.block_manager import BlockManager
from batching.generation.config import EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.handle import Outbox
from batching.generation.observer import EngineObserver
from batching.generation.request import Request

OwnerT = TypeVar("OwnerT")


class SlotTable(Generic[OwnerT]):
    """Rows 0..in_use-1 are held, each by one owner with a length (K/V entries written)."""

    def __init__(self, num_slots: int, max_seq_len: int) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError("num_slots and max_seq_len must be >= 1")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.owners: list[OwnerT] = []  # owners[row]; len(owners) == in_use
        self.lengths: list[int] = []  # tokens already written to the K/V cache, per row

    @property
    def in_use(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.owners)

    def allocate(self, owner: OwnerT) -> int:
        """Give `owner` the next free row (length 0); returns the row."""
        if self.free == 0:
            raise RuntimeError("no free row")
        self.owners.append(owner)
        self.lengths.append(0)
        return len(self.owners) - 1

    def advance(self, row: int, tokens: int = 1) -> None:
        """`tokens` more K/V entries were written for the sequence in `row`."""
        new_length = self.lengths[row] + tokens
        if new_length > self.max_seq_len:
            raise RuntimeError(f"row {row} would outgrow the context of {self.max_seq_len}")
        self.lengths[row] = new_length

    def release(self, row: int) -> None:
        """Free `row`; if it was not the last, the last row moves into it."""
        if not 0 <= row < len(self.owners):
            raise IndexError(f"row {row} is not in use")
        last = len(self.owners) - 1
        if row != last:
            self.owners[row] = self.owners[last]
            self.lengths[row] = self.lengths[last]
        self.owners.pop()
        self.lengths.pop()


logger = logging.getLogger(__name__)


class Placement:
    def __init__(
        self,
        slots: SlotTable[Request],
        outbox: Outbox,
        observer: EngineObserver,
        release: Callable[[Request], None],
        config: EngineConfig,
        *,
        tokenizer: Tokenizer,
        grammar_tokenizer: object,
        blocks: BlockManager,
    ) -> None:
        self._slots = slots
        self._outbox = outbox
        self._observer = observer
        self._release = release
        self._tokenizer = tokenizer  # the engine thread's own copy
        self._special_tokens = config.special_tokens  # their text never reaches a client
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
