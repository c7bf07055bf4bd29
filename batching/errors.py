"""Exceptions raised by the engines. service/ maps each one to an HTTP status."""


class EngineError(Exception):
    """Base class for everything the engines raise on purpose."""


class QueueFullError(EngineError):
    """The bounded waiting queue is full; the caller should retry later (HTTP 503)."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"queue is full ({max_queue} waiting); retry later")
        self.max_queue = max_queue


class QueueTimeoutError(EngineError):
    """The request waited longer than its timeout before compute started (HTTP 504)."""

    def __init__(self, waited_s: float, timeout_s: float) -> None:
        super().__init__(f"waited {waited_s:.2f}s in queue, longer than the {timeout_s:g}s timeout")
        self.waited_s = waited_s
        self.timeout_s = timeout_s


class PromptTooLongError(EngineError):
    """prompt_tokens + max_new_tokens can never fit in one KV-cache slot (HTTP 422)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} > the context limit of {max_seq_len} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_seq_len = max_seq_len


class EngineStoppedError(EngineError):
    """The engine is not running (not started, draining, or its loop died) and did no work
    for this request (HTTP 503: a proxy may retry it elsewhere)."""


class RequestInterruptedError(EngineStoppedError):
    """The engine stopped or died while computing this request: its drain ran out, or its
    loop crashed (HTTP 500: work had started, so it must not be retried elsewhere blindly)."""


class ModelExecutionError(EngineError):
    """The model raised while computing this request (HTTP 500)."""


class InvalidInputError(EngineError):
    """One input the engine or model cannot take; only its own request fails (HTTP 422)."""
