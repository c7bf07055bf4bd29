"""Structured output: a grammar decides which tokens a row may produce next (llguidance).

A request's grammar is compiled once, before it reaches the engine, under limits
(`GrammarCompiler`, below); each of its choices gets its own matcher, a cheap copy of the
compiled one, when it is admitted. Before each of its tokens is sampled, the matcher's bitmask
of allowed tokens is applied to that row's logits (sampling.py: disallowed tokens get -inf);
the sampled token then advances the matcher, and the request finishes ("stop") when the grammar
is complete. Rows without a grammar are never touched, so they pay nothing.

Compiling, off the event loop and off the engine thread, under limits: llguidance can spend
time and memory exponential in a small schema (an `allOf` of 29 string patterns: gigabytes;
600 `patternProperties`: minutes), and its own limits (lexer fuel, item counts) do not bound
that analysis. So a grammar is first tried in a worker process (`worker_main`: this module run
as `python -m batching.generation.grammar`) under a memory limit (RLIMIT_AS) and a wall-clock
deadline; a worker that runs out of either is killed and replaced, and the request gets a
GrammarRejectedError. Only a grammar the worker built is then built again here, in a thread,
where it is known to finish within the same bounds. The result is cached by grammar text (LRU,
rejections included, so a client resending a bad schema costs nothing), and concurrent requests
for one grammar wait for one compile. The request's choices all share the CompiledGrammar.

    compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_ids, GrammarLimits())
    grammar = await compiler.compile(json_schema_grammar(schema))  # or GrammarRejectedError

This module imports only the standard library, llguidance and batching.errors (never torch):
the worker process imports it too, and must start in well under a second and within its
address-space limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llguidance

from batching.errors import EngineStoppedError, InvalidInputError, QueueTimeoutError

logger = logging.getLogger(__name__)

_ERROR_CHARS = 300  # llguidance's messages may quote the grammar: a client gets a short head


def error_text(error: object) -> str:
    """llguidance's error as a client sees it: one line, its non-verbose markers dropped,
    at most _ERROR_CHARS characters."""
    return " ".join(str(error).replace("<non-verbose/>", "").split())[:_ERROR_CHARS]


def grammar_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """llguidance's view of a (fast) Hugging Face tokenizer, sized to the model's logits."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(
        hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
    )


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for JSON that validates against `schema` (None: any JSON object), compact
    (no free whitespace, which a model with random weights would otherwise fill forever)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"},
            overrides={"whitespace_flexible": False},
        )
    except ValueError as exc:
        raise InvalidInputError(f"invalid JSON schema: {error_text(exc)}") from exc


class CompiledGrammar:
    """A grammar that built within its limits, ready to hand out matchers. Never mutated:
    every choice of every request that uses it gets its own copy (microseconds)."""

    def __init__(self, tokenizer: Any, grammar: str, limits: Any = None) -> None:
        """Build it in the calling thread (llguidance drops the GIL meanwhile). This is the
        grammar compile: the engine thread never calls it (see GrammarCompiler)."""
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        if self._matcher.is_error():
            raise InvalidInputError(f"invalid grammar: {error_text(self._matcher.get_error())}")

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._matcher.deep_copy())


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._check()

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may be generated."""
        return bool(self._matcher.is_stopped())

    def bitmask(self) -> bytes | None:
        """Which tokens may come next: bit b of 32-bit word w is token 32 * w + b (int32
        words, little-endian); None: every token (see below). sampling.py applies it."""
        words = bytes(self._matcher.compute_bitmask())
        if self._matcher.is_error():
            # A step limit was hit or nothing can extend the output: allow every token so the
            # step goes on for the neighbours; consume() then fails this row alone.
            return None
        return words

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise InvalidInputError(f"grammar error: {error_text(self._matcher.get_error())}")


# ---- compiling under limits (on the event loop; the worker is a process of its own) ----

_WORKER_START_S = 120.0  # building a 150k-token vocabulary takes about a second; be generous


@dataclass(frozen=True)
class ParserLimits:
    """llguidance's own limits (LLParserLimits), applied to the worker and to every matcher:
    the step limits bound each token's mask computation on the engine thread."""

    max_items_in_row: int = 2_000
    initial_lexer_fuel: int = 1_000_000
    step_lexer_fuel: int = 200_000  # ~14k/ms: at most ~15 ms of lexing per token
    step_max_items: int = 50_000  # ~20k/ms: at most ~3 ms of parsing per token
    max_lexer_states: int = 250_000
    max_grammar_size: int = 500_000
    verbose_errors: bool = False  # verbose errors quote the grammar into logs and answers

    def llguidance(self) -> Any:
        return llguidance.LLParserLimits(**asdict(self))


@dataclass(frozen=True)
class GrammarLimits:
    max_grammar_bytes: int = 65_536  # the grammar text (a JSON schema's, nearly its own size)
    timeout_s: float = 10.0  # one compile in a worker, wall clock
    memory_mb: int = 1_024  # one worker's address space
    workers: int = 2  # compiles that may run at once
    cache_size: int = 128  # compiled (and refused) grammars kept, by text
    wait_s: float = 30.0  # longest wait for a free worker (then QueueTimeoutError)
    parser: ParserLimits = field(default_factory=ParserLimits)


class GrammarRejectedError(InvalidInputError):
    """The grammar is invalid or over a limit; `reason` is "invalid", "too_large", "timeout"
    or "memory". Only the client's request fails (HTTP 4xx)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _CompileAbandonedError(Exception):
    """The request that started a shared compile was cancelled (its client went away); the
    others waiting for the same grammar start their own instead of failing with it."""


class _Worker:
    """One child process and its pipes."""

    def __init__(
        self, process: asyncio.subprocess.Process, on_exit: Callable[[_Worker], None]
    ) -> None:
        self.process = process
        self.on_exit = on_exit

    async def ask(self, line: str) -> dict[str, Any] | None:
        """The worker's answer, or None if it died (EOF)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await self.process.stdout.readline()
        return json.loads(answer) if answer else None

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        self.on_exit(self)


class GrammarCompiler:
    def __init__(
        self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], limits: GrammarLimits
    ) -> None:
        self.limits = limits
        self._setup = json.dumps(
            {
                "tokenizer": tokenizer_json,
                "n_vocab": vocab_size,
                "eos": eos_token_ids,
                "memory_bytes": limits.memory_mb << 20,
                "limits": asdict(limits.parser),
            }
        )
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids
        )
        self._parser_limits = limits.parser.llguidance()
        self._cache: OrderedDict[str, CompiledGrammar | GrammarRejectedError] = OrderedDict()
        self._compiling: dict[str, asyncio.Future[CompiledGrammar]] = {}
        self._idle: asyncio.Queue[_Worker | None] | None = None  # made on the loop that uses it
        self._workers: set[_Worker] = set()  # alive, idle or busy
        self._closed = False  # close() was called: the server is stopping

    @property
    def tokenizer(self) -> Any:
        """llguidance's tokenizer (also gives each token's exact bytes, for logprobs)."""
        return self._tokenizer

    async def compile(self, grammar: str) -> CompiledGrammar:
        """The compiled grammar, or GrammarRejectedError within about timeout_s (after waiting
        at most wait_s for a free worker: QueueTimeoutError); EngineStoppedError once close()
        was called (a compile it cut off included: that is not the grammar's fault)."""
        if self._closed:
            raise _stopping()
        if len(grammar.encode()) > self.limits.max_grammar_bytes:
            raise _rejected(
                "too_large",
                f"the grammar is {len(grammar.encode())} bytes, over the limit of "
                f"{self.limits.max_grammar_bytes}",
            )
        cached = self._cache.get(grammar)
        if cached is not None:
            self._cache.move_to_end(grammar)
            if isinstance(cached, GrammarRejectedError):
                raise GrammarRejectedError(cached.reason, str(cached))
            return cached
        running = self._compiling.get(grammar)
        if running is not None:
            try:
                return await asyncio.shield(running)
            except _CompileAbandonedError:  # its first asker went away: compile it afresh
                return await self.compile(grammar)
        future: asyncio.Future[CompiledGrammar] = asyncio.get_running_loop().create_future()
        self._compiling[grammar] = future
        try:
            compiled = await self._compile_now(grammar)
        except GrammarRejectedError as exc:
            self._remember(grammar, exc)
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) get it from their own await
            raise
        except BaseException as exc:  # not the grammar's fault: do not remember it
            future.set_exception(exc if isinstance(exc, Exception) else _CompileAbandonedError())
            future.exception()
            raise
        finally:
            del self._compiling[grammar]
        self._remember(grammar, compiled)
        future.set_result(compiled)
        return compiled

    async def close(self) -> None:
        """Stop every worker, busy ones too (their compiles fail with EngineStoppedError)."""
        self._closed = True
        for worker in list(self._workers):
            await worker.kill()

    # ---- internals ----

    async def _compile_now(self, grammar: str) -> CompiledGrammar:
        started = time.perf_counter()
        try:
            await self._try_in_worker(grammar)
        except Exception as exc:
            if self._closed and not isinstance(exc, EngineStoppedError):
                raise _stopping() from exc  # its worker was killed by close(), say
            raise
        # The worker built it within the limits, so this build is bounded the same way.
        compiled = await asyncio.to_thread(
            CompiledGrammar, self._tokenizer, grammar, self._parser_limits
        )
        logger.debug("compiled a %d-byte grammar in %.3fs", len(grammar), _since(started))
        return compiled

    async def _try_in_worker(self, grammar: str) -> None:
        idle = self._idle_workers()
        waited = time.perf_counter()
        try:
            worker = await asyncio.wait_for(idle.get(), self.limits.wait_s)
        except TimeoutError:
            raise QueueTimeoutError(_since(waited), self.limits.wait_s) from None
        answer: dict[str, Any] | None = None
        timed_out = False
        try:
            worker = worker or await self._start_worker()
            try:
                answer = await asyncio.wait_for(
                    worker.ask(json.dumps(grammar)), self.limits.timeout_s
                )
            except TimeoutError:
                timed_out = True
            if answer is None:  # over the deadline, or the worker died (out of memory)
                await worker.kill()
                worker = None
        except BaseException:
            if worker is not None:
                await worker.kill()
            worker = None
            raise
        finally:
            idle.put_nowait(worker)  # None: the next user starts a fresh one
        if answer is None and self._closed:
            raise _stopping()  # close() killed the worker: neither a timeout nor memory
        if timed_out:
            raise _rejected(
                "timeout", f"compiling the grammar took over {self.limits.timeout_s:g}s"
            )
        if answer is None:
            raise _rejected(
                "memory", f"compiling the grammar needed over {self.limits.memory_mb} MiB"
            )
        if answer["error"]:
            raise _rejected("invalid", f"invalid grammar: {error_text(answer['error'])}")

    def _idle_workers(self) -> asyncio.Queue[_Worker | None]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.limits.workers):
                self._idle.put_nowait(None)  # started on first use
        return self._idle

    async def _start_worker(self) -> _Worker:
        if self._closed:  # close() ran while a compile waited for a worker: start none
            raise _stopping()
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds batching/
        paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
        environment = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batching.generation.grammar",  # worker_main()
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # Rust's allocation-failure banner
            env=environment,
            limit=1 << 20,
        )
        worker = _Worker(process, self._workers.discard)
        self._workers.add(worker)
        if self._closed:  # close() ran while the process started: it did not see this one
            await worker.kill()
            raise _stopping()
        try:
            ready = await asyncio.wait_for(worker.ask(self._setup), _WORKER_START_S)
        except BaseException:
            await worker.kill()
            raise
        if not ready:
            await worker.kill()
            raise RuntimeError("the grammar worker did not start")
        return worker

    def _remember(self, grammar: str, outcome: CompiledGrammar | GrammarRejectedError) -> None:
        self._cache[grammar] = outcome
        while len(self._cache) > self.limits.cache_size:
            self._cache.popitem(last=False)


def _rejected(reason: str, message: str) -> GrammarRejectedError:
    # INFO, never the grammar's text: any client can send one, and it is their error.
    logger.info("grammar refused: %s", reason)
    return GrammarRejectedError(reason, message)


def _stopping() -> EngineStoppedError:
    return EngineStoppedError("the server is stopping: the grammar was not compiled")


def _since(started: float) -> float:
    return time.perf_counter() - started


# ---- the worker process ----


def try_grammar(tokenizer: Any, grammar: str, limits: Any) -> str:
    """ "" if the grammar builds and yields its first mask; else llguidance's error."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    if not matcher.is_error():
        matcher.compute_bitmask()  # the lexer's first use can blow up too
    return str(matcher.get_error()) if matcher.is_error() else ""


def worker_main() -> None:
    """The compile worker (GrammarCompiler starts it): builds one grammar at a time under a
    memory limit, so that a grammar which explodes kills this process, never the server.
    Protocol, one JSON document per line: the parent writes the setup ({"tokenizer",
    "n_vocab", "eos", "memory_bytes", "limits"}), the worker answers {"ready": true}; then for
    each grammar (a JSON string) it answers {"error": ""} (usable) or {"error": "..."}."""
    setup = json.loads(sys.stdin.readline())
    memory = int(setup["memory_bytes"])
    # The limit covers address space: a failed allocation aborts this process, which the
    # parent reads as "over the memory limit" (EOF on our stdout).
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    tokenizer = llguidance.LLTokenizer(
        setup["tokenizer"], n_vocab=setup["n_vocab"], eos_token=setup["eos"]
    )
    limits = llguidance.LLParserLimits(**setup["limits"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        error = try_grammar(tokenizer, json.loads(line), limits)
        print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    worker_main()
