"""Grammar compiles under limits: refused with a reason, in bounded time, the server's process
untouched (the work runs in a worker process that is killed and replaced)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from copy import copy
from pathlib import Path
from typing import Any

import pytest

from batching.errors import EngineStoppedError, InvalidInputError
from batching.generation.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarLimits,
    GrammarRejectedError,
    json_schema_grammar,
)
from tests.batching.conftest import EOS_ID, VOCAB_SIZE

OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# Under 1 KB (774 bytes as compact JSON): llguidance's regex analysis of it takes
# exponential time and memory.
ALL_OF_PATTERNS = {"allOf": [{"type": "string", "pattern": f"[a-z]{{{n}}}"} for n in range(1, 30)]}
# Valid, but minutes to compile: every key must be checked against 600 patterns.
PATTERN_PROPERTIES = {
    "type": "object",
    "patternProperties": {f"^k{n}_[a-z]+$": {"type": "string"} for n in range(600)},
}


def make_compiler(tokenizer: Any, **limits: Any) -> GrammarCompiler:
    backend = copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return GrammarCompiler(backend.to_str(), VOCAB_SIZE, [EOS_ID], GrammarLimits(**limits))


async def rejection(compiler: GrammarCompiler, schema: dict[str, Any]) -> GrammarRejectedError:
    with pytest.raises(GrammarRejectedError) as caught:
        await asyncio.wait_for(compiler.compile(json_schema_grammar(schema)), 120)
    return caught.value


async def test_a_schema_that_explodes_in_memory_is_refused_and_the_next_one_compiles(tokenizer):
    compiler = make_compiler(tokenizer, memory_mb=256, timeout_s=60)
    try:
        assert (await rejection(compiler, ALL_OF_PATTERNS)).reason == "memory"
        assert isinstance(await compiler.compile(json_schema_grammar(OBJECT)), CompiledGrammar)
    finally:
        await compiler.close()


async def test_a_schema_over_the_deadline_is_refused_and_the_worker_replaced(tokenizer):
    compiler = make_compiler(tokenizer, timeout_s=1, workers=1)
    try:
        error = await rejection(compiler, PATTERN_PROPERTIES)
        assert error.reason == "timeout" and "1s" in str(error)
        assert isinstance(await compiler.compile(json_schema_grammar(OBJECT)), CompiledGrammar)
    finally:
        await compiler.close()


async def test_a_schema_over_the_size_cap_is_refused_without_a_compile(tokenizer):
    compiler = make_compiler(tokenizer, max_grammar_bytes=256)
    error = await rejection(compiler, PATTERN_PROPERTIES)
    assert error.reason == "too_large" and "256" in str(error)
    assert not compiler._workers  # no worker was even started


async def test_a_refused_schema_is_remembered_and_refused_again_at_once(tokenizer):
    compiler = make_compiler(tokenizer, timeout_s=1, workers=1)
    try:
        await rejection(compiler, PATTERN_PROPERTIES)
        workers_before = set(compiler._workers)
        again = await rejection(compiler, PATTERN_PROPERTIES)
        assert again.reason == "timeout"
        assert compiler._workers == workers_before  # no worker was asked (or killed) again
    finally:
        await compiler.close()


async def test_one_schema_asked_for_at_once_is_compiled_once_and_shared(tokenizer):
    compiler = make_compiler(tokenizer)
    try:
        grammar = json_schema_grammar(OBJECT)
        results = await asyncio.gather(*(compiler.compile(grammar) for _ in range(4)))
        assert all(result is results[0] for result in results)
        first, second = results[0].new_matcher(), results[0].new_matcher()
        assert first is not second  # each choice advances its own copy
    finally:
        await compiler.close()


async def test_an_invalid_schema_is_refused_and_logged_without_its_text(tokenizer, caplog):
    compiler = make_compiler(tokenizer)
    recursive = {"$ref": "#/$defs/loop", "$defs": {"loop": {"$ref": "#/$defs/loop"}}}
    try:
        with caplog.at_level(logging.DEBUG):
            assert (await rejection(compiler, {"type": "nonsense-type"})).reason == "invalid"
            assert (await rejection(compiler, recursive)).reason == "invalid"
    finally:
        await compiler.close()
    assert all(r.levelno <= logging.INFO for r in caplog.records)
    assert not any(
        "nonsense-type" in r.getMessage() or "loop" in r.getMessage() for r in caplog.records
    )


async def test_a_shared_compile_whose_first_asker_leaves_still_answers_the_others(tokenizer):
    compiler = make_compiler(tokenizer)
    grammar = json_schema_grammar(OBJECT)
    try:
        first = asyncio.create_task(compiler.compile(grammar))
        while not compiler._workers:  # the first asker's compile is under way in a worker
            await asyncio.sleep(0)
        second = asyncio.create_task(compiler.compile(grammar))
        await asyncio.sleep(0)  # the second now waits for the first's compile
        first.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await first
        assert isinstance(await asyncio.wait_for(second, 120), CompiledGrammar)
    finally:
        await compiler.close()


async def test_an_invalid_grammar_is_told_in_one_short_line(tokenizer):
    compiler = make_compiler(tokenizer)
    long_pattern = {"type": "string", "pattern": "(" + "a" * 5000}  # the error quotes it
    try:
        refused = await rejection(compiler, long_pattern)
        with pytest.raises(InvalidInputError) as built_here:  # the same, built in-process
            CompiledGrammar(compiler.tokenizer, json_schema_grammar(long_pattern))
    finally:
        await compiler.close()
    for message in (str(refused), str(built_here.value)):
        assert "\n" not in message and "non-verbose" not in message and len(message) < 400


def busy(worker: Any) -> bool:
    """The grammar was sent and its answer is awaited (asyncio's StreamReader waits on data)."""
    return worker.process.stdout._waiter is not None


async def test_a_compile_cut_off_by_close_reads_as_server_stopping_not_as_a_rejection(tokenizer):
    compiler = make_compiler(tokenizer, timeout_s=60, workers=1)
    slow = json_schema_grammar(PATTERN_PROPERTIES)  # minutes: still compiling at close()
    await compiler.compile(json_schema_grammar(OBJECT))  # the worker is up, and idle again
    compiling = asyncio.create_task(compiler.compile(slow))
    while not any(busy(worker) for worker in compiler._workers):
        await asyncio.sleep(0.01)
    # Another grammar waits for the one worker; close() frees its place, and it must not
    # start a worker of its own then (nothing would stop that one).
    queued = asyncio.create_task(compiler.compile(json_schema_grammar({"type": "boolean"})))
    await asyncio.sleep(0.2)
    await compiler.close()
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(compiling, 60)
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(queued, 60)
    assert slow not in compiler._cache  # not remembered as the grammar's fault
    with pytest.raises(EngineStoppedError):  # and no worker is started after close()
        await compiler.compile(json_schema_grammar({"type": "array"}))
    assert not compiler._workers


def test_the_grammar_module_loads_without_torch_so_its_worker_starts_light() -> None:
    # The worker process runs this module under an address-space limit (GRAMMAR_COMPILE_
    # MEMORY_MB): torch's libraries alone would take most of it.
    probe = "import sys, batching.generation.grammar; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"
