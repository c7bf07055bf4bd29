"""Token-level continuous batching: `GenerationEngine`, the loop that serves /generate.

One engine thread owns the batch rows, the KV blocks and the model; it is their only writer.
Event-loop handlers only `submit()` (which validates and queues, under one lock) and read their
handle. Each step is schedule -> run -> postprocess (nano-vllm's `LLMEngine.step`):

* schedule (scheduler.py, under the lock that guards the queue): `StepPlanner.schedule()`
  returns the step as data, a `StepPlan`: the rows it retired, the waiting requests it dropped
  (client gone, timed out), the sequences it preempted back to the queue when the KV pool ran
  short (resumed later by recomputing what they had written), the requests it admitted into
  free rows (their cached prefix blocks shared), the prompt chunk(s) to prefill, the rows that
  decode, and whether prefill and decode share one forward (a mixed step);
* run and postprocess (running_batch.py): `RunningBatch.run(plan)` answers the retired rows,
  runs the forward(s), samples one token per row, hands the tokens to the handles and retires
  rows that ended (their rows and blocks serve the next request in the very next step).

When there is nothing to do the thread sleeps on a Condition: no polling.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from batching.errors import (
    EngineStoppedError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)
from batching.generation.attention import PagedAttentionReport
from batching.generation.block_manager import BlockManager
from batching.generation.chunk_sizing import (
    ChunkLimits,
    measure_chunk_limits,
)
from batching.generation.config import DEFAULT_PREFILL_CHUNK_TOKENS, EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.handle import GenerationHandle, Outbox, fail_now
from batching.generation.model_runner import ModelRunner, build_paged_cache
from batching.generation.model_support import (
    check_mixed_step,
    check_prefill_and_decode,
    check_supported,
    make_probe,
    mixed_steps_unavailable,
)
from batching.generation.observer import EngineObserver, NoopEngineObserver
from batching.generation.request import Request, SubmissionRules
from batching.generation.running_batch import RunningBatch
from batching.generation.sampling import SamplingParams
from batching.generation.scheduler import Scheduler, SlotTable, StepPlan, StepPlanner
from batching.generation.static_decode import CudaGraphsReport

logger = logging.getLogger(__name__)

STOP_JOIN_GRACE_S = 5.0  # stop() waits this long beyond the drain timeout for the thread


@dataclass(frozen=True)
class KVCacheBlocks:
    """How much KV memory the engine has and uses, in blocks of `block_size` tokens."""

    block_size: int
    blocks_total: int
    blocks_used: int

    @property
    def usage_ratio(self) -> float:
        return self.blocks_used / self.blocks_total


class GenerationEngine:
    """Continuous batching over a pool of KV blocks, on one engine thread, as `config` says
    (config.py); `self.config` is what it runs with (max_seq_len capped by the pool)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        observer: EngineObserver | None = None,
        grammar_tokenizer: object = None,  # grammar.grammar_tokenizer(); None: no grammars
    ) -> None:
        # A private copy: a fast tokenizer is one Rust object, and transformers' encode() takes
        # a mutable borrow of it (truncation/padding state), so a decode here racing an encode
        # on the event loop can fail with "RuntimeError: Already borrowed"
        # (huggingface/transformers#47085, vllm-project/vllm#40949). Only this thread uses it.
        engine_tokenizer = copy.deepcopy(tokenizer)
        block_size = config.kv_block_size
        blocks = config.kv_cache_blocks or config.num_slots * -(-config.max_seq_len // block_size)
        max_seq_len = min(config.max_seq_len, blocks * block_size)
        check_supported(model, max_seq_len)  # UnsupportedModelError before any memory is taken
        prefix_caching = config.prefix_cache_tokens > 0
        self._blocks = BlockManager(blocks, block_size, prefix_caching=prefix_caching)
        self._runner = ModelRunner(
            model,
            build_paged_cache(model, blocks, block_size, max_seq_len),
            max_rows=config.num_slots,
            cuda_graphs=config.cuda_graphs,
            kv_bucket_min=config.kv_bucket_min,
            paged_attention=config.paged_attention,
        )
        mixed_steps = config.mixed_steps
        self._mixed_off_reason = mixed_steps_unavailable(model) if mixed_steps else None
        if self._mixed_off_reason is not None:
            logger.warning("mixed steps are off: %s", self._mixed_off_reason)
            mixed_steps = False
        # What the engine runs with: max_seq_len capped by the pool, mixed steps where possible.
        self.config = replace(config, max_seq_len=max_seq_len, mixed_steps=mixed_steps)
        logger.info("attention layers: %s", self._runner.masks.pattern.describe())

        self._slots: SlotTable[Request] = SlotTable(config.num_slots, max_seq_len)
        vocab_size: int = model.get_input_embeddings().num_embeddings  # type: ignore[operator]
        self._rules = SubmissionRules(config.num_slots, max_seq_len, vocab_size, grammar_tokenizer)
        self._scheduler: Scheduler[Request] = Scheduler(
            config.max_queue, config.timeout_s, config.priority_aging_s
        )
        self._evicted: list[Request] = []  # refused from a full queue for a more urgent one
        # Every accepted request until its handle ends, wherever it is (queue, rows, a plan
        # being run): if the loop dies mid-step, _shut answers each one still unanswered.
        self._live: set[Request] = set()
        self._observer: EngineObserver = observer or NoopEngineObserver()
        self._outbox = Outbox(self._observer)
        self._planner = StepPlanner(
            self._slots,
            self._blocks,
            self._observer,
            self.config,
            _initial_limits(config.prefill_chunk_tokens),
        )
        self._batch = RunningBatch(
            self._runner,
            self._planner,
            self._outbox,
            self._observer,
            self.config,
            tokenizer=engine_tokenizer,
        )
        self._measure_chunk = config.prefill_chunk_tokens == "auto"  # by warm_up()
        self._max_stall_steps = config.max_stall_steps
        self._cond = threading.Condition()  # guards the scheduler and the flags below
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._drain_deadline_s = float("inf")
        self._death: BaseException | None = None
        self._request_ids = itertools.count(1)
        self._step_started_s: float | None = None  # perf_counter() while a step runs

    # ---- what the service reads (gauges, /info, /health) ----

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs; False before start(), after stop(), or if it died."""
        return self._thread is not None and self._thread.is_alive() and self._death is None

    @property
    def step_running_s(self) -> float:
        """How long the current engine step has been running (0 between steps): a model call
        that never returns shows here, and /health turns 503 past ENGINE_STEP_TIMEOUT_S."""
        started_s = self._step_started_s
        return 0.0 if started_s is None else time.perf_counter() - started_s

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
    def kv_cache_blocks(self) -> KVCacheBlocks:
        """KV memory in blocks: the one place /metrics reads KV use and size from
        (kv_cache_usage_ratio, vllm:kv_cache_usage_perc, vllm:cache_config_info). A block
        shared by several sequences counts once; free cached prefix blocks count as free."""
        return KVCacheBlocks(
            block_size=self._blocks.block_size,
            blocks_total=self._blocks.num_blocks,
            blocks_used=self._blocks.used_blocks,
        )

    @property
    def kv_cache_usage_ratio(self) -> float:
        """KV blocks held by sequences / blocks in the pool (cached free blocks not counted)."""
        return self._blocks.usage_ratio

    @property
    def kv_cache_bytes(self) -> int:
        return self._runner.cache.nbytes

    @property
    def kv_block_size(self) -> int:
        return self._blocks.block_size

    @property
    def kv_blocks_total(self) -> int:
        return self._blocks.num_blocks

    @property
    def kv_blocks_used(self) -> int:
        return self._blocks.used_blocks

    @property
    def kv_blocks_cached(self) -> int:
        """Blocks indexed by the prefix cache (held by sequences or free)."""
        return self._blocks.cached_blocks

    @property
    def kv_cache_tokens(self) -> int:
        """Token positions the pool holds."""
        return self._blocks.num_blocks * self._blocks.block_size

    @property
    def preemptions_total(self) -> int:
        return self._planner.preemptions

    @property
    def prefix_cache_enabled(self) -> bool:
        return self._blocks.prefix_caching

    @property
    def prefix_cache_bytes(self) -> int:
        """Memory of the blocks the prefix cache indexes (they are pool blocks, not extra)."""
        return self._blocks.cached_blocks * self._runner.cache.bytes_per_block

    @property
    def prefix_cache_usage_ratio(self) -> float:
        return self._blocks.cached_blocks / self._blocks.num_blocks

    def memory_summary(self) -> dict[str, int]:
        """What /info and the start-up log say about KV memory."""
        return {
            "block_size": self.kv_block_size,
            "blocks": self.kv_blocks_total,
            "bytes": self.kv_cache_bytes,
            "tokens": self.kv_cache_tokens,
        }

    @property
    def prefill_chunk_limits(self) -> ChunkLimits:
        """Prompt tokens a step prefills while rows decode (measured by warm_up() if "auto")."""
        return self._planner.chunk_limits

    @property
    def max_seq_len(self) -> int:
        return self._slots.max_seq_len

    @property
    def cuda_graphs(self) -> CudaGraphsReport:
        """Whether decode steps replay CUDA graphs (decided by warm_up()), and which buckets."""
        return self._runner.cuda_graphs

    @property
    def paged_attention(self) -> PagedAttentionReport:
        """How the decode step's attention reads the KV blocks (gather or in place), and why."""
        return self._runner.paged_attention

    # ---- lifecycle ----

    def warm_up(self, prompt_tokens: int = 16, decode_steps: int = 2) -> None:
        """Check the engine's paths against the model's own forward (_check_paths: refuses the
        model or turns mixed steps off), run prefill and decode for 1 row and for every slot
        once, then capture the decode step's CUDA graphs where they can be used, and with
        prefill_chunk_tokens="auto" measure the chunk size (chunk_sizing.py); call before
        start()."""
        if self._thread is not None:
            raise RuntimeError(
                "warm_up() must run before start(): the engine thread owns the cache"
            )
        prompt = [0] * max(1, min(prompt_tokens, self.max_seq_len - decode_steps))
        with torch.inference_mode():
            # The model's own forward judges the reference (gather) paths first, so a model
            # is never refused for the in-place kernel's rounding; that kernel is then judged
            # against the gather, and only falls back to it if it differs.
            self._runner.gather_until_chosen()
            self._check_paths()  # eager steps; capture_cuda_graphs checks replays against them
            self._runner.choose_paged_attention()  # in place or gather
            for rows in sorted({1, self.slots_total}):
                tables = self._runner.scratch_tables(rows, len(prompt) + decode_steps)
                self._runner.prefill(tables, [prompt] * rows)
                lengths = [len(prompt)] * rows
                for _ in range(decode_steps):
                    self._runner.decode_step([0] * rows, lengths, tables)
                    lengths = [n + 1 for n in lengths]
            self._runner.capture_cuda_graphs()
            if self._measure_chunk:
                limits = measure_chunk_limits(
                    self._runner,
                    DEFAULT_PREFILL_CHUNK_TOKENS,
                    mixed=self._planner.mixed_steps,
                    max_stall_steps=self._max_stall_steps,
                )
                self._planner.chunk_limits = limits
                logger.info("prefill chunk limits measured: %s", limits.as_dict())

    def _check_paths(self) -> None:
        """Compare the engine's prefill, decode (graph replays included) and mixed steps with the
        model's own forward on probe rows (model_support.py). A prefill or decode that differs
        raises UnsupportedModelError: the model is refused. A mixed step that differs or fails
        (a model whose attention cannot be split) turns mixed steps off, with the reason logged
        and in /info, instead of failing over to separate forwards at every step."""
        probe = make_probe(self._runner)
        check_prefill_and_decode(self._runner, probe)
        if not self._planner.mixed_steps or self.slots_total < 2:
            return
        reason = check_mixed_step(self._runner, probe)
        if reason is not None:
            logger.warning(
                "mixed steps are off: %s; prefill and decode run as separate forwards", reason
            )
            self._mixed_off_reason = reason
            self._planner.mixed_steps = False

    @property
    def mixed_steps_off_reason(self) -> str | None:
        """Why mixed steps are off although they were asked for (None: on, or not asked for):
        the model's attention cannot be split, or warm-up found a mixed step differs."""
        return self._mixed_off_reason

    @property
    def attention_layout(self) -> str:
        """The model's attention layers as the engine masks them ("full", "sliding 8 + full")."""
        return self._runner.masks.pattern.describe()

    @property
    def mixed_steps(self) -> bool:
        """Whether a step's prefill runs in the decode forward (False if warm-up found it
        cannot)."""
        return self._planner.mixed_steps

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
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_namespace: str = "",
    ) -> GenerationHandle:
        """Queue one generation; iterate the returned handle for its deltas.

        Raises at once: EngineStoppedError (not running), PromptTooLongError (prompt +
        max_new_tokens > max_seq_len), InvalidInputError (empty prompt, unknown token id, a
        grammar that cannot be used), QueueFullError (max_queue requests already wait).
        """
        (handle,) = await self.submit_choices(
            prompt_ids,
            [params],
            request_id=request_id,
            priority=priority,
            cache_namespace=cache_namespace,
        )
        return handle

    async def submit_choices(
        self,
        prompt_ids: Sequence[int],
        choices: Sequence[SamplingParams],
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_namespace: str = "",
    ) -> list[GenerationHandle]:
        """Queue len(choices) generations of one prompt (OpenAI's `n`): they share one
        prefill, then each samples with its own params. One handle per choice; raises as
        submit() does, and InvalidInputError if they could never get their slots at once.
        `cache_namespace`: the prefix-cache entries it may use and adds to (prefix_cache.py)."""
        if not (self._accepting and self.is_alive):
            raise EngineStoppedError("the generation engine is not running")
        self._rules.check(prompt_ids, choices, priority)
        name = request_id or f"gen-{next(self._request_ids)}"
        loop = asyncio.get_running_loop()
        requests = [
            Request(
                GenerationHandle(name, loop, self._wake),
                list(prompt_ids),
                params,
                priority,
                cache_namespace,
            )
            for params in choices
        ]
        for follower in requests[1:]:
            follower.follow(requests[0])
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the generation engine is stopping")
            # The leader stands in the queue for them all.
            try:
                evicted = self._scheduler.add(
                    requests[0], time.perf_counter(), free_slots=self._slots.free
                )
            except QueueFullError:
                self._observer.on_rejected("queue_full", priority)
                raise
            if evicted is not None:
                self._evicted.append(evicted)  # answered by the engine thread, its outbox
            self._live.update(requests)
            self._cond.notify()
        for request in requests:
            request.handle.add_end_callback(functools.partial(self._forget, request))
        # The engine thread answers timed-out requests between steps; this timer answers them
        # on time even while one step runs long. It is cancelled when the leader's handle ends,
        # so a finished request is not kept alive for REQUEST_TIMEOUT_S by the timer.
        timer = loop.call_later(self._scheduler.timeout_s, self._expire_if_waiting, requests[0])
        requests[0].handle.add_end_callback(lambda _result, _error: timer.cancel())
        return [r.handle for r in requests]

    def _forget(self, request: Request, _result: object, _error: object) -> None:
        """On the event loop, once the request's handle has ended."""
        with self._cond:
            self._live.discard(request)

    def _expire_if_waiting(self, leader: Request) -> None:
        """On the event loop: a request still queued at its timeout gets QueueTimeoutError."""
        with self._cond:
            # A preempted request that had started streamed tokens: it waits to resume, not to
            # be admitted, so the queue timeout is not its own (drop_stale spares it too).
            if leader.started or not self._scheduler.remove(leader):
                return  # admitted, answered, or taken by the engine thread already
        now_s = time.perf_counter()
        self._observer.on_rejected("timeout", leader.priority)
        for request in leader.group:
            error = QueueTimeoutError(now_s - leader.arrival_s, self._scheduler.timeout_s)
            if fail_now(request.handle, error):
                waited_s = now_s - leader.arrival_s
                self._observer.on_finish("error", request.prompt_tokens, 0, waited_s)

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
            self._shut("the generation engine loop died")  # the cause is in the log, not here
        else:
            self._shut("the generation engine stopped")

    def _wait_for_work(self) -> bool:
        """Sleep until there is work; False once stopping and nothing is left running."""
        with self._cond:
            while not (self._stopping or self._slots.in_use or len(self._scheduler)):
                self._cond.wait()
            if self._stopping:
                late = time.perf_counter() > self._drain_deadline_s
                for leader in list(self._scheduler):
                    if leader.started and not late:
                        continue  # preempted: it finishes in the drain, as if running
                    # Past the deadline a preempted request is not resumed only to be failed.
                    self._scheduler.remove(leader)
                    error: Callable[[], Exception]
                    if leader.started:
                        error = functools.partial(RequestInterruptedError, "the engine stopped")
                    else:
                        error = functools.partial(EngineStoppedError, "the engine is stopping")
                    self._fail_group(leader, error)
            waiting = len(self._scheduler)
        self._outbox.flush()
        return not self._stopping or self._slots.in_use > 0 or waiting > 0

    def _step(self) -> None:
        """schedule -> run -> postprocess: the plan is data (StepPlan), run by RunningBatch."""
        self._step_started_s = time.perf_counter()
        try:
            self._answer_evicted()
            with self._cond:
                plan = self._planner.schedule(self._scheduler, time.perf_counter())
            self._answer_dropped(plan)
            self._batch.run(plan)
            if self._stopping and time.perf_counter() > self._drain_deadline_s:
                stopped = "the engine stopped before this request ended"
                self._batch.fail_all(lambda: RequestInterruptedError(stopped))
                with self._cond:
                    preempted = self._scheduler.take_all()
                for leader in preempted:
                    self._fail_group(leader, lambda: RequestInterruptedError(stopped))
            self._outbox.flush()
        finally:
            self._requeue_preempted()
            self._planner.note_step(time.perf_counter() - self._step_started_s)
            self._step_started_s = None

    def _requeue_preempted(self) -> None:
        """Sequences preempted while the step ran (a row its prefill completed found no block
        for its first decode token, or a follower none for its copy) wait again."""
        preempted = self._planner.take_preempted()
        if preempted:
            with self._cond:
                for request in reversed(preempted):
                    self._scheduler.requeue(request)

    def _answer_evicted(self) -> None:
        """503 for the requests a more urgent one pushed out of the full queue."""
        with self._cond:
            evicted, self._evicted = self._evicted, []
        for leader in evicted:
            self._observer.on_rejected("queue_full", leader.priority)
            self._fail_group(leader, lambda: QueueFullError(self._scheduler.max_queue))

    def _answer_dropped(self, plan: StepPlan) -> None:
        """The waiting requests the plan dropped, answered at no compute: cancelled ones end
        as cancelled, timed-out ones get QueueTimeoutError."""
        now_s = time.perf_counter()
        for leader in plan.cancelled:
            for request in leader.group:
                request.finish_reason = "cancelled"
                self._outbox.finish(request, now_s)
        for leader in plan.timed_out:
            self._observer.on_rejected("timeout", leader.priority)
            waited_s, limit_s = now_s - leader.arrival_s, self._scheduler.timeout_s
            self._fail_group(leader, functools.partial(QueueTimeoutError, waited_s, limit_s))

    def _fail_group(self, leader: Request, make_error: Callable[[], Exception]) -> None:
        for request in leader.group:
            self._outbox.fail(request, make_error())

    def _shut(self, message: str) -> None:
        """The loop ended (stopped or died): waiting requests get EngineStoppedError, the ones
        in rows or preempted (computed in part) RequestInterruptedError; so does every other
        accepted request not yet answered."""
        with self._cond:  # one section: no submit can evict into _evicted after this
            self._accepting = False
            waiting = self._scheduler.take_all()
        self._answer_evicted()
        for leader in waiting:
            error = RequestInterruptedError if leader.started else EngineStoppedError
            self._fail_group(leader, functools.partial(error, message))
        for slot in range(self._slots.in_use - 1, -1, -1):
            request = self._slots.owners[slot]
            self._planner.release(request)
            self._outbox.fail(request, RequestInterruptedError(message))
        # A step that died between taking requests off the queue or out of their rows and
        # answering them (a fault while planning or running) leaves them nowhere above: the
        # ones not yet answered are answered here (the outbox skips the ones that were).
        with self._cond:
            live = list(self._live)
        for request in live:
            error = RequestInterruptedError if request.started else EngineStoppedError
            self._outbox.fail(request, error(message))
        self._outbox.flush()


def _initial_limits(prefill_chunk_tokens: int | Literal["auto"] | ChunkLimits) -> ChunkLimits:
    """The limits until warm-up measures them ("auto"), or for good (a number, or limits)."""
    if isinstance(prefill_chunk_tokens, ChunkLimits):
        return prefill_chunk_tokens
    if prefill_chunk_tokens == "auto":
        return ChunkLimits.fixed(DEFAULT_PREFILL_CHUNK_TOKENS)
    return ChunkLimits.fixed(prefill_chunk_tokens)
