"""The audit log: one JSON line per work request, written off the event loop.

Which model version answered which request, when, how fast and with what outcome: request id,
time, route, client (a hashed API key or the IP), model and revision, status, latency, token
counts, finish reason, priority. Inputs and outputs only with AUDIT_LOG_CONTENT=true (they
are personal data more often than not). Every work request gets its line, errors, 429s and
cancelled streams included.

A line is written when the HTTP exchange has ended *and* every generation it started has
ended: a shadow behind NGINX's mirror loses its client right after the headers, but keeps
generating (GENERATE_CANCEL_ON_DISCONNECT=false), and its line then carries the full output
for scripts/compare_shadow.py.

Writing never blocks a request: records go through the standard library's QueueHandler to a
QueueListener thread, which writes them with a RotatingFileHandler (or to stdout).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import queue
import sys
import time
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batching.generation.handle import GenerationHandle, GenerationResult

AUDITED_PREFIXES = ("/predict", "/generate", "/v1/", "/tokenize", "/detokenize")
MAX_CONTENT_BYTES = 1_048_576  # a body is logged up to this size (the app refuses more anyway)


class AuditLog:
    """Owns the sink: a rotating file, or stdout."""

    def __init__(self, target: str, *, with_content: bool, max_bytes: int, backups: int) -> None:
        self.with_content = with_content
        if target == "stdout":
            sink: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            sink = RotatingFileHandler(target, maxBytes=max_bytes, backupCount=backups)
        sink.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = QueueListener(self._queue, sink)
        # A logger of its own, not registered with logging's global manager: two apps in one
        # process (tests) get two audit logs.
        self._logger = logging.Logger("service.audit", logging.INFO)
        self._logger.addHandler(QueueHandler(self._queue))
        self._logger.propagate = False
        self.sink = sink

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        """Writes what is queued, then ends the writer thread."""
        self._listener.stop()
        self.sink.close()

    def write(self, record: dict[str, Any]) -> None:
        self._logger.info(json.dumps(record, separators=(",", ":"), default=str))


class AuditRecord:
    """One request's line in the making; routes add what they know."""

    def __init__(self, log: AuditLog, fields: dict[str, Any]) -> None:
        self.log = log
        self.fields = fields
        self._open_generations = 0
        self._http_done = False

    @property
    def with_content(self) -> bool:
        return self.log.with_content

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def track(self, handles: list[GenerationHandle]) -> None:
        """The line waits for these generations to end, and records their outcome."""
        outputs: list[dict[str, Any] | None] = [None] * len(handles)
        for index, handle in enumerate(handles):
            self._open_generations += 1
            handle.add_end_callback(self._generation_end(index, outputs))

    def _generation_end(self, index: int, outputs: list[dict[str, Any] | None]) -> Any:
        def ended(result: GenerationResult | None, error: BaseException | None) -> None:
            if result is not None:
                outputs[index] = {"text": result.text, "token_ids": list(result.token_ids)}
                self.fields["prompt_tokens"] = result.prompt_tokens
                self.fields["cached_tokens"] = result.cached_tokens
                completion = self.fields.get("completion_tokens") or 0
                self.fields["completion_tokens"] = completion + result.completion_tokens
                reasons = self.fields.setdefault("finish_reasons", [None] * len(outputs))
                reasons[index] = result.finish_reason
            else:
                self.fields.setdefault("generation_error", type(error).__name__)
            if self.with_content:
                self.fields["output"] = outputs if len(outputs) > 1 else outputs[0]
            self._open_generations -= 1
            self._maybe_write()

        return ended

    def http_done(self, status: int, latency_ms: float) -> None:
        self.fields["status"] = status
        self.fields["latency_ms"] = round(latency_ms, 3)
        self._http_done = True
        self._maybe_write()

    def _maybe_write(self) -> None:
        if self._http_done and self._open_generations == 0:
            self._http_done = False  # exactly one line
            self.log.write(self.fields)


def audit_of(request: Request) -> AuditRecord | None:
    record: AuditRecord | None = getattr(request.state, "audit", None)
    return record


def audit_model(request: Request, name: str, revision: str) -> None:
    """Which model answers this request (called where a route picks its model)."""
    record = audit_of(request)
    if record is not None:
        record.set(model=name, revision=revision)


def audit_priority(request: Request, priority: int) -> None:
    record = audit_of(request)
    if record is not None:
        record.set(priority=priority)


def audit_generations(request: Request, handles: list[GenerationHandle]) -> None:
    record = audit_of(request)
    if record is not None:
        record.track(handles)


def audit_predictions(request: Request, predictions: list[Any], prompt_tokens: int) -> None:
    record = audit_of(request)
    if record is None:
        return
    record.set(items=len(predictions), prompt_tokens=prompt_tokens)
    if record.with_content:
        record.set(output=[dataclasses.asdict(p) for p in predictions])


class AuditMiddleware:
    """Opens a record for every work request, closes it when the response has ended."""

    def __init__(self, app: ASGIApp, log: AuditLog, client_of: Any) -> None:
        self.app = app
        self.log = log
        self.client_of = client_of  # Request -> "key:<hash>" or "ip:<address>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUDITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        state = scope.setdefault("state", {})
        record = AuditRecord(
            self.log,
            {
                "request_id": state.get("request_id", ""),
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "method": scope["method"],
                "route": scope["path"],
                "client": self.client_of(Request(scope)),
                "priority": None,
            },
        )
        state["audit"] = record
        status = {"code": 500}  # if the app ends without a response start
        body = bytearray()

        async def recording_receive() -> Message:
            message = await receive()
            if record.with_content and message["type"] == "http.request":
                body.extend(message.get("body", b"")[: MAX_CONTENT_BYTES - len(body)])
            return message

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, recording_receive, recording_send)
        finally:
            if record.with_content:
                record.set(input=_as_json(bytes(body)))
            record.http_done(status["code"], (time.perf_counter() - started_s) * 1000)


def _as_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return body.decode("utf-8", errors="replace")
