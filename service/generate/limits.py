"""The request limits of generation, written once for /generate and /v1: text length, prompts,
choices, and the output length. A refusal names the request field at fault (`FieldError`), so
/generate says it in its message and /v1 also as OpenAI's `param`.

The context is the limit of prompt + output: a request may ask any output length that fits
after its prompt (the engine refuses one that cannot, with the numbers), and by default gets
all of it. GENERATE_MAX_NEW_TOKENS is an operator cap on top, generous by default.
"""

from __future__ import annotations

from service.errors import ApiError
from service.settings import Settings


class FieldError(ApiError):
    """A 422 (400 on /v1) that names the request field at fault."""

    def __init__(
        self, param: str | None, message: str, error_type: str = "invalid_request"
    ) -> None:
        super().__init__(422, error_type, f"{param}: {message}" if param else message)
        self.param = param


def with_field(error: ApiError, param: str) -> ApiError:
    """An engine refusal of the input (422: context overflow, bad token id) charged to `param`;
    other errors as they are."""
    if error.status != 422 or isinstance(error, FieldError):
        return error
    named = FieldError(None, error.message, error.error_type)
    named.param = param
    return named


def checked_text(text: str, param: str, settings: Settings) -> str:
    """Prompt text (or chat content) within GENERATE_MAX_PROMPT_CHARS, checked before the
    tokenizer or a chat template spends time on it."""
    limit = settings.generate_max_prompt_chars
    if len(text) > limit:
        raise FieldError(param, f"{len(text)} characters, more than the limit of {limit}")
    return text


def checked_conversation_size(messages: int, chars: int, settings: Settings) -> None:
    """A chat before its template runs (a Jinja program whose cost grows with its input):
    at most GENERATE_MAX_MESSAGES messages and GENERATE_MAX_PROMPT_CHARS characters."""
    if messages > settings.generate_max_messages:
        raise FieldError(
            "messages",
            f"{messages} messages, more than the limit of {settings.generate_max_messages}",
        )
    if chars > settings.generate_max_prompt_chars:
        raise FieldError(
            "messages",
            f"{chars} characters of content, more than the limit of "
            f"{settings.generate_max_prompt_chars}",
        )


def checked_prompt_count(count: int, settings: Settings, param: str = "prompt") -> int:
    limit = settings.generate_max_prompts
    if count < 1:
        raise FieldError(param, "give at least one prompt")
    if count > limit:
        raise FieldError(
            param, f"{count} prompts, more than the limit of {limit} (GENERATE_MAX_PROMPTS)"
        )
    return count


def checked_choices(choices: int, settings: Settings, param: str = "n") -> int:
    limit = settings.generate_max_choices
    if choices > limit:
        raise FieldError(param, f"{choices} is above the limit of {limit}")
    return choices


def max_new_tokens_for(
    requested: int | None,
    prompt_tokens: int,
    max_seq_len: int,
    settings: Settings,
    param: str = "max_new_tokens",
    allow_zero: bool = False,
) -> int:
    """The output length of one prompt: as asked (the engine refuses what cannot fit, with
    the numbers), or by default all that fits after the prompt, up to the operator cap."""
    cap = settings.generate_max_new_tokens
    if requested is None:
        # A prompt with no room left still gets 1: the engine then explains the overflow.
        return max(1, min(cap, max_seq_len - prompt_tokens))
    if requested > cap:
        raise FieldError(
            param, f"{requested} is above the limit of {cap} (GENERATE_MAX_NEW_TOKENS)"
        )
    if requested == 0 and not allow_zero:
        raise FieldError(param, "0 is only allowed with echo (to score the prompt)")
    return requested
