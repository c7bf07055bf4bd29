"""Token-level continuous batching: `GenerationEngine`, the loop that serves /generate.

One engine thread owns the slots, the KV cache and the model; it is their only writer. Event-loop
handlers only `submit()` (which validates and queues, under one lock) and read their handle.
Each step: retire cancelled rows, admit waiting requests into free slots and prefill them
together, run one decode forward over all active rows, sample one token per row, push the
tokens to the handles, retire finished rows (their slots serve the next request in the very
next step). When there is nothing to do the thread sleeps on a Condition: no polling.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    ModelExecutionError,
    PromptTooLongError,
    QueueTimeoutError,
)
from batching.generation.cuda_graphs import CudaGraphsMode, CudaGraphsReport
from batching.generation.detokenizer import Tokenizer
from batching.generation.handle import GenerationHandle
from batching.generation.model_runner import ModelRunner, build_slot_cache
from batching.generation.observer import EngineObserver, NoopEngineObserver
from batching.generation.outbox import Outbox
from batching.generation.request import Request
from batching.generation.sampling import SamplingParams, sample_next_tokens
from batching.generation.scheduler import Scheduler
from batching.generation.slots import SlotTable

logger = logging.getLogger(__name__)

# Prefill work admitted per step, in padded prompt tokens. A prefill runs before that step's
# decode, so every running request waits for it: the budget bounds that hiccup in their
# inter-token latency, while still admitting a whole burst of short prompts in one forward
# (batched prefill is far cheaper than one prompt per step). One request is always admitted
# when a slot is free, however long its prompt, so long prompts cannot starve.
DEFAULT_PREFILL_TOKEN_BUDGET = 2048
STOP_JOIN_GRACE_S = 5.0  # stop() waits this long beyond the drain timeout for the thread


class GenerationEngine:
    """Continuous batching over a fixed pool of KV-cache slots, on one engine thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: Sequence[int],
        num_slots: int,
        max_seq_len: int,
        max_queue: int,
        timeout_s: float,
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
        observer: EngineObserver | None = None,
        cuda_graphs: CudaGraphsMode = "auto",
        kv_bucket_min: int | None = None,  # None: see buckets.decode_kv_buckets
    ) -> None:
        # A private copy: a fast tokenizer is one Rust object, and transformers' encode() takes
        # a mutable borrow of it (truncation/padding state), so a decode here racing an encode
        # on the event loop can fail with "RuntimeError: Already borrowed"
        # (huggingface/transformers#47085, vllm-project/vllm#40949). Only this thread uses it.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._eos_token_ids = frozenset(eos_token_ids)
        self._runner = ModelRunner(
            model,
            build_slot_cache(model, num_slots, max_seq_len),
            cuda_graphs=cuda_graphs,
            kv_bucket_min=kv_bucket_min,
        )
        self._vocab_size: int = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
        self._slots: SlotTable[Request] = SlotTable(num_slots, max_seq_len)
        self._scheduler: Scheduler[Request] = Scheduler(max_queue, timeout_s)
        self._prefill_token_budget = prefill_token_budget
        self._observer: EngineObserver = observer or NoopEngineObserver()
        self._outbox = Outbox(self._observer)
        self._cond = threading.Condition()  # guards the scheduler and the flags below
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._drain_deadline_s = float("inf")
        self._death: BaseException | None = None
        self._request_ids = itertools.count(1)

    # ---- what the service reads (gauges, /info, /health) ----

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs; False before start(), after stop(), or if it died."""
        return self._thread is not None and self._thread.is_alive() and self._death is None

    @property
    def slots_total(self) -> int:
        return self._slots.num_slots

    @property
    def slots_in_use(self) -> int:
        return self._slots.in_use

    @property
    def waiting_requests(self) -> int:
        return len(self._scheduler)

    @property
    def kv_cache_usage_ratio(self) -> float:
        return self._slots.usage_ratio

    @property
    def kv_cache_bytes(self) -> int:
        return self._runner.cache.nbytes

    @property
    def max_seq_len(self) -> int:
        return self._slots.max_seq_len

    @property
    def cuda_graphs(self) -> CudaGraphsReport:
        """Whether decode steps replay CUDA graphs (decided by warm_up()), and which buckets."""
        return self._runner.cuda_graphs

    # ---- lifecycle ----

    def warm_up(self, prompt_tokens: int = 16, decode_steps: int = 2) -> None:
        """Run prefill and decode for 1 row and for every slot once, then capture the decode
        step's CUDA graphs where they can be used; call before start()."""
        if self._thread is not None:
            raise RuntimeError(
                "warm_up() must run before start(): the engine thread owns the cache"
            )
        prompt = [0] * max(1, min(prompt_tokens, self.max_seq_len - decode_steps))
        with torch.inference_mode():
            for rows in sorted({1, self.slots_total}):
                self._runner.prefill(0, [prompt] * rows)
                lengths = [len(prompt)] * rows
                for _ in range(decode_steps):
                    self._runner.decode_step([0] * rows, lengths)
                    lengths = [n + 1 for n in lengths]
            self._runner.capture_cuda_graphs()

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is not None:
            raise RuntimeError("GenerationEngine.start() may be called only once")
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, fail waiting ones, let running ones finish for up to
        drain_timeout_s, then fail the rest (EngineStoppedError) and end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._drain_deadline_s = time.perf_counter() + drain_timeout_s
            self._cond.notify()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, drain_timeout_s + STOP_JOIN_GRACE_S)
            if thread.is_alive():
                logger.warning("generation engine thread still in a model step after stop()")

    # ---- the event-loop side ----

    async def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None
    ) -> GenerationHandle:
        """Queue one generation; iterate the returned handle for its deltas.

        Raises at once: EngineStoppedError (not running), PromptTooLongError (prompt +
        max_new_tokens > max_seq_len), InvalidInputError (empty prompt, unknown token id),
        QueueFullError (max_queue requests already wait).
        """
        if not (self._accepting and self.is_alive):
            raise EngineStoppedError("the generation engine is not running")
        self._validate(prompt_ids, params)
        handle = GenerationHandle(
            request_id or f"gen-{next(self._request_ids)}", asyncio.get_running_loop(), self._wake
        )
        request = Request(handle, list(prompt_ids), params)
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the generation engine is stopping")
            self._scheduler.add(request)
            self._cond.notify()
        return handle

    def _validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidInputError("the prompt has no tokens")
        if not self._slots.fits(len(prompt_ids), params.max_new_tokens):
            raise PromptTooLongError(len(prompt_ids), params.max_new_tokens, self.max_seq_len)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self._vocab_size:
            raise InvalidInputError(f"token ids must be in [0, {self._vocab_size})")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    self._step()
        except BaseException as exc:
            logger.exception("the generation engine loop died")
            self._death = exc
            self._shut(f"the generation engine loop died: {exc!r}")
        else:
            self._shut("the generation engine stopped")

    def _wait_for_work(self) -> bool:
        """Sleep until there is work; False once stopping and nothing is left running."""
        with self._cond:
            while not (self._stopping or self._slots.in_use or len(self._scheduler)):
                self._cond.wait()
            if self._stopping:
                for request in self._scheduler.take_all():
                    self._outbox.fail(request, EngineStoppedError("the engine is stopping"))
        self._outbox.flush()
        return not self._stopping or self._slots.in_use > 0

    def _step(self) -> None:
        for request in self._slots.owners:
            if request.cancelled and request.finish_reason is None:
                request.finish_reason = "cancelled"
        self._retire_finished()
        admitted = self._take_admissions()
        if admitted:
            self._prefill(admitted)
            self._outbox.flush()  # first tokens go out before this step's decode
        if self._slots.in_use:
            self._decode()
        if self._stopping and time.perf_counter() > self._drain_deadline_s:
            self._fail_running(
                lambda: EngineStoppedError("the engine stopped before this request ended")
            )
        self._outbox.flush()

    def _take_admissions(self) -> list[Request]:
        now_s = time.perf_counter()
        with self._cond:
            cancelled, timed_out = self._scheduler.drop_stale(now_s)
            admitted = self._scheduler.admit(self._slots.free, self._prefill_token_budget)
        for request in cancelled:
            request.finish_reason = "cancelled"
            self._outbox.finish(request, now_s)
        for request in timed_out:
            waited_s = now_s - request.arrival_s
            self._outbox.fail(request, QueueTimeoutError(waited_s, self._scheduler.timeout_s))
        return admitted

    def _prefill(self, admitted: list[Request]) -> None:
        first_slot = self._slots.in_use
        now_s = time.perf_counter()
        for request in admitted:
            request.admit(self._tokenizer, now_s)
            self._slots.allocate(request, request.prompt_tokens, request.params.max_new_tokens)
        try:
            logits = self._runner.prefill(first_slot, [r.prompt_ids for r in admitted])  # [k, V]
            tokens = sample_next_tokens(
                logits, [r.params for r in admitted], [r.generator for r in admitted]
            )
        except Exception as exc:
            logger.exception("prefill failed for %d requests", len(admitted))
            self._fail_running(_model_error(exc), from_slot=first_slot)
            return
        now_s = time.perf_counter()
        for offset, (request, token) in enumerate(zip(admitted, tokens, strict=True)):
            self._slots.advance(first_slot + offset, request.prompt_tokens)
            self._outbox.token(request, request.accept(token, self._eos_token_ids, now_s))
        self._retire_finished()

    def _decode(self) -> None:
        rows = list(self._slots.owners)
        self._observer.on_step(len(rows))
        try:
            tokens_in = [r.next_token for r in rows]
            logits = self._runner.decode_step(tokens_in, list(self._slots.lengths))
            tokens = sample_next_tokens(
                logits, [r.params for r in rows], [r.generator for r in rows]
            )
        except Exception as exc:
            logger.exception("decode step failed for %d requests", len(rows))
            self._fail_running(_model_error(exc))
            return
        now_s = time.perf_counter()
        gaps_s = [now_s - (r.last_token_s or now_s) for r in rows]
        for slot, (request, token) in enumerate(zip(rows, tokens, strict=True)):
            self._slots.advance(slot)
            self._outbox.token(request, request.accept(token, self._eos_token_ids, now_s))
        self._observer.on_token_gaps(gaps_s)
        self._retire_finished()

    def _retire_finished(self) -> None:
        """Release finished rows, highest slot first, keeping active rows packed."""
        now_s = time.perf_counter()
        for slot in range(self._slots.in_use - 1, -1, -1):
            request = self._slots.owners[slot]
            if request.finish_reason is None:
                continue
            self._release(slot)
            self._outbox.finish(request, now_s)

    def _fail_running(self, make_error: Callable[[], Exception], from_slot: int = 0) -> None:
        """Fail the rows from `from_slot` up, each with its own exception object."""
        for slot in range(self._slots.in_use - 1, from_slot - 1, -1):
            request = self._slots.owners[slot]
            self._release(slot)
            self._outbox.fail(request, make_error())

    def _release(self, slot: int) -> None:
        move = self._slots.release(slot)
        if move is not None:
            self._runner.cache.move_slot(move.source, move.target, move.length)

    def _shut(self, message: str) -> None:
        """The loop ended (stopped or died): every request still here gets EngineStoppedError."""
        with self._cond:
            self._accepting = False
            waiting = self._scheduler.take_all()
        for request in waiting:
            self._outbox.fail(request, EngineStoppedError(message))
        for slot in range(self._slots.in_use - 1, -1, -1):
            request = self._slots.owners[slot]
            self._slots.release(slot)
            self._outbox.fail(request, EngineStoppedError(message))
        self._outbox.flush()


def _model_error(cause: Exception) -> Callable[[], Exception]:
    """A factory of ModelExecutionError chained to the model's own exception."""

    def make() -> Exception:
        error = ModelExecutionError(f"the model failed: {cause!r}")
        error.__cause__ = cause
        return error

    return make
