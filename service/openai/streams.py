"""Server-sent events for /v1: the n choices of one request merged into one stream of chunks,
in the shape of chat completions or of the legacy completions API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batching.generation.handle import GenerationDelta, GenerationHandle, GenerationResult
from batching.generation.sampling import TokenLogprob
from service.errors import ApiError, as_api_error
from service.generate.streaming import sse_event, stream_deltas
from service.openai.errors import openai_error_body
from service.openai.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from service.openai.schemas import FinishReason, PromptTokensDetails, Usage
from service.openai.tools.plan import ToolPlan
from service.openai.tools.stream import ToolStream


@dataclass(frozen=True)
class Completion:
    """One admitted request (its n choices) and what every response or chunk repeats."""

    handles: list[GenerationHandle]  # prompt i's choice j at index i * choices + j
    id: str
    model: str
    created: int
    cancel_on_disconnect: bool
    texts: TokenTexts
    choices: int = 1  # per prompt (OpenAI's n)

    def chunk(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return head | {"choices": choices} | extra


def finish_reason(result: GenerationResult) -> FinishReason:
    if result.finish_reason == "cancelled":  # only reachable if the client is gone anyway
        raise ApiError(499, "client_closed", "the request was cancelled")
    return "length" if result.finish_reason == "length" else "stop"  # eos, stop, grammar done


def usage(results: Sequence[GenerationResult], choices: int = 1) -> Usage:
    """OpenAI counts each prompt once and the completion tokens of every choice."""
    firsts = results[::choices]  # one result per prompt
    prompt = sum(r.prompt_tokens for r in firsts)
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(r.cached_tokens for r in firsts)
        ),
    )


class ChunkFormat(Protocol):
    kind: str

    def opening(self, index: int) -> dict[str, Any] | None: ...

    def pieces(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]: ...

    def end(self, index: int, reason: FinishReason) -> list[dict[str, Any]]: ...


@dataclass
class _Pending:
    """Logprobs of tokens whose text is not out yet (half a UTF-8 character), per choice."""

    entries: dict[int, list[TokenLogprob]] = field(default_factory=dict)

    def take(self, index: int, new: Sequence[TokenLogprob], ready: bool) -> list[TokenLogprob]:
        waiting = self.entries.setdefault(index, [])
        waiting += new
        if not ready:
            return []
        self.entries[index] = []
        return waiting


@dataclass
class ChatChunks:
    texts: TokenTexts
    tools: ToolPlan | None = None
    kind: str = "chat.completion.chunk"
    _pending: _Pending = field(default_factory=_Pending)
    _tool_streams: dict[int, ToolStream] = field(default_factory=dict)

    def opening(self, index: int) -> dict[str, Any] | None:
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def pieces(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        if self.tools is not None and self.tools.calls_tools:
            deltas = self._tool_stream(index).feed(delta.text)
            entries = self._pending.take(index, delta.logprobs, ready=bool(deltas))
            return self._with_logprobs(index, deltas, entries)
        entries = self._pending.take(index, delta.logprobs, ready=bool(delta.text))
        if not delta.text:
            return []
        logprobs = chat_logprobs(entries, self.texts).model_dump() if entries else None
        content = {"content": delta.text}
        return [{"index": index, "delta": content, "logprobs": logprobs, "finish_reason": None}]

    def end(self, index: int, reason: FinishReason) -> list[dict[str, Any]]:
        if self.tools is not None and self.tools.calls_tools:
            deltas, reason = self._tool_stream(index).finish(reason)
            entries = self._pending.take(index, (), ready=True)
            return self._with_logprobs(index, [*deltas, {}], entries, reason)
        entries = self._pending.take(index, (), ready=True)
        logprobs = chat_logprobs(entries, self.texts).model_dump() if entries else None
        return [{"index": index, "delta": {}, "logprobs": logprobs, "finish_reason": reason}]

    def _tool_stream(self, index: int) -> ToolStream:
        assert self.tools is not None  # only called with tools
        return self._tool_streams.setdefault(index, ToolStream(self.tools))

    def _with_logprobs(
        self,
        index: int,
        deltas: list[dict[str, Any]],
        entries: list[TokenLogprob],
        reason: FinishReason | None = None,
    ) -> list[dict[str, Any]]:
        """Tool-call deltas do not follow token boundaries (a call is sent whole, arguments are
        held back): the logprobs of the tokens since the choice's last chunk ride on its next
        one, so that a stream carries each token's logprobs once, in order, as the answer
        without stream does. `reason` goes on the last delta."""
        choices = []
        for position, delta in enumerate(deltas):
            last = position == len(deltas) - 1
            logprobs = None
            if entries and position == 0:
                logprobs = chat_logprobs(entries, self.texts).model_dump()
            choices.append(
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": reason if last else None,
                }
            )
        return choices


@dataclass
class CompletionChunks:
    texts: TokenTexts
    echoes: list[str] | None  # each prompt's text, when echoed
    prompt_ids: list[list[int]]
    waits_for_prompt_logprobs: bool  # echo with logprobs: echo once they are computed
    choices: int = 1  # per prompt: choice index i belongs to prompt i // choices
    kind: str = "text_completion"
    _pending: _Pending = field(default_factory=_Pending)
    _offsets: dict[int, int] = field(default_factory=dict)

    def _echo(self, index: int) -> str | None:
        return None if self.echoes is None else self.echoes[index // self.choices]

    def opening(self, index: int) -> dict[str, Any] | None:
        echo = self._echo(index)
        if echo is None or self.waits_for_prompt_logprobs:
            return None
        return self._choice(index, echo, None)

    def pieces(self, index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        echo = self._echo(index)
        if delta.prompt_logprobs and echo is not None:
            prompt_ids = self.prompt_ids[index // self.choices]
            logprobs = completion_logprobs(delta.prompt_logprobs, prompt_ids, self.texts)
            self._offsets[index] = len(echo)
            return [self._choice(index, echo, logprobs.model_dump())]
        entries = self._pending.take(index, delta.logprobs, ready=bool(delta.text))
        if not delta.text:
            return []
        return [self._choice(index, delta.text, self._logprobs(index, entries))]

    def end(self, index: int, reason: FinishReason) -> list[dict[str, Any]]:
        entries = self._pending.take(index, (), ready=True)
        return [self._choice(index, "", self._logprobs(index, entries), reason)]

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not entries:
            return None
        offset = self._offsets.get(index, len(self._echo(index) or ""))
        ids = [e.token_id for e in entries]
        logprobs = completion_logprobs(entries, ids, self.texts, offset)
        self._offsets[index] = offset + sum(len(t) for t in logprobs.tokens)
        return logprobs.model_dump()

    @staticmethod
    def _choice(
        index: int, text: str, logprobs: dict[str, Any] | None, reason: FinishReason | None = None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


async def merged(
    run: Completion, first: GenerationDelta | None
) -> AsyncIterator[tuple[int, GenerationDelta | GenerationResult]]:
    """(choice index, delta) as each choice produces them, then (index, its result)."""
    queue: asyncio.Queue[tuple[int, GenerationDelta | GenerationResult | Exception]]
    queue = asyncio.Queue()

    async def pump(index: int, handle: GenerationHandle, peeked: GenerationDelta | None) -> None:
        try:
            async for delta in stream_deltas(handle, peeked, run.cancel_on_disconnect):
                queue.put_nowait((index, delta))
            queue.put_nowait((index, handle.result))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [
        asyncio.ensure_future(pump(i, handle, first if i == 0 else None))
        for i, handle in enumerate(run.handles)
    ]
    try:
        ended = 0
        while ended < len(tasks):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            ended += isinstance(item, GenerationResult)
            yield index, item
    finally:
        for task in tasks:
            task.cancel()  # stream_deltas lets its generation go


async def sse_chunks(
    run: Completion, first: GenerationDelta | None, form: ChunkFormat, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for index in range(len(run.handles)):
            opening = form.opening(index)
            if opening is not None:
                yield sse_event(run.chunk(form.kind, [opening]))
        results: dict[int, GenerationResult] = {}
        async for index, item in merged(run, first):
            if isinstance(item, GenerationResult):
                results[index] = item
                for piece in form.end(index, finish_reason(item)):
                    yield sse_event(run.chunk(form.kind, [piece]))
            else:
                for piece in form.pieces(index, item):
                    yield sse_event(run.chunk(form.kind, [piece]))
        if include_usage:
            ordered = [results[i] for i in sorted(results)]
            summed = usage(ordered, run.choices).model_dump()
            yield sse_event(run.chunk(form.kind, [], usage=summed))
    except Exception as exc:
        # Headers are gone already: the failure travels as an event the SDKs raise from.
        request_id = run.handles[0].request_id
        yield sse_event(openai_error_body(as_api_error(exc, request_id))[1])
    yield sse_event("[DONE]")
