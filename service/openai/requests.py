"""OpenAI request -> engine input: prompt token ids (chat template or raw prompt) and
SamplingParams with OpenAI's defaults, refusing what this server cannot honour."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from jinja2 import TemplateError

from batching.errors import InvalidInputError
from batching.generation.sampling import SamplingParams
from service.generate.service import GenerationService, sampling_params
from service.generate.special_tokens import chat_ids
from service.openai.errors import OpenAIError
from service.openai.schemas import ChatMessage, SamplingRequest


def reject_unsupported(body: SamplingRequest) -> None:
    for param, asked in body.unsupported().items():
        if asked:
            hint = " (one choice per request)" if param == "n" else ""
            value = getattr(body, param)
            raise OpenAIError(f"{param}={value!r} is not supported by this server{hint}", param)


def checked_prompt_text(text: str, param: str, service: GenerationService) -> str:
    limit = service.settings.generate_max_prompt_chars
    if len(text) > limit:
        raise OpenAIError(f"{param}: {len(text)} characters, more than the limit of {limit}", param)
    return text


def checked_conversation(
    messages: list[ChatMessage], service: GenerationService
) -> list[dict[str, str]]:
    """The messages as template input, refused before the template runs if there are too many
    or too much text: a chat template is a Jinja program whose cost grows with its input."""
    settings = service.settings
    if len(messages) > settings.generate_max_messages:
        raise OpenAIError(
            f"messages: {len(messages)} messages, more than the limit of "
            f"{settings.generate_max_messages}",
            "messages",
        )
    conversation = [message.for_template() for message in messages]
    chars = sum(len(message["content"]) for message in conversation)
    if chars > settings.generate_max_prompt_chars:
        raise OpenAIError(
            f"messages: {chars} characters of content, more than the limit of "
            f"{settings.generate_max_prompt_chars}",
            "messages",
        )
    return conversation


def chat_prompt_ids(messages: list[ChatMessage], service: GenerationService) -> list[int]:
    tokenizer = service.loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError("the served model has no chat template: use /v1/completions", None)
    conversation = checked_conversation(messages, service)
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:  # templates raise on conversations they refuse
        raise OpenAIError(f"messages: {exc}", "messages") from exc
    # The template writes any special tokens (BOS, role markers) itself: add none twice.
    rendered = checked_prompt_text(str(text), "messages", service)
    contents = [message["content"] for message in conversation]
    allow = service.settings.generate_special_tokens_in_prompts
    try:
        return chat_ids(tokenizer, rendered, contents, allow)
    except InvalidInputError as exc:
        raise OpenAIError(str(exc), "messages") from exc


def completion_prompt_ids(
    prompt: str | list[str] | list[int], service: GenerationService
) -> list[int]:
    if isinstance(prompt, str):
        return service.encode(checked_prompt_text(prompt, "prompt", service))
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return service.encode(checked_prompt_text(prompt[0], "prompt", service))
    if prompt and all(isinstance(token, int) for token in prompt):
        return [int(token) for token in prompt]  # token ids; the engine checks the range
    raise OpenAIError("prompt: one prompt per request (a string or a list of token ids)", "prompt")


def checked_max_tokens(
    body: SamplingRequest, prompt_tokens: int, service: GenerationService, echo: bool = False
) -> int:
    limit = service.settings.generate_max_new_tokens
    param, requested = body.requested_max_tokens()
    if requested is None:
        # Like OpenAI: by default, as many as fit (the engine explains a prompt with no room).
        return max(1, min(limit, service.engine.max_seq_len - prompt_tokens))
    if requested > limit:
        raise OpenAIError(f"{param}: {requested} is above the limit of {limit}", param)
    if requested == 0 and not echo:
        raise OpenAIError(f"{param}: 0 is only allowed with echo (to score the prompt)", param)
    return requested


def checked_choices(body: SamplingRequest, service: GenerationService) -> int:
    limit = service.settings.generate_max_choices
    if body.choices > limit:
        raise OpenAIError(f"n: {body.choices} is above the limit of {limit}", "n")
    return body.choices


def response_schema(body: SamplingRequest) -> tuple[dict[str, Any] | None, bool]:
    """(JSON schema, whether any JSON object will do) from a chat request's response_format."""
    form = getattr(body, "response_format", None)
    if form is None or form.type == "text":
        return None, False
    if form.type == "json_object":
        return None, True
    if form.json_schema is None or form.json_schema.json_schema is None:
        raise OpenAIError("response_format: json_schema.schema is required", "response_format")
    return form.json_schema.json_schema, False


def to_sampling_params(
    body: SamplingRequest, max_tokens: int, prompt_logprobs: int | None = None
) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # keeping only the most likely token is greedy decoding
        temperature, top_p = 0.0, 1.0
    try:
        return sampling_params(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=body.stop_list,
            logprobs=body.top_logprobs_asked(),
            prompt_logprobs=prompt_logprobs,
        )
    except InvalidInputError as exc:
        raise OpenAIError(str(exc), None) from exc


async def with_response_format(
    body: SamplingRequest, params: SamplingParams, service: GenerationService
) -> SamplingParams:
    """params with response_format's grammar, compiled once for all n choices. A schema the
    compiler refuses (invalid, or over a GRAMMAR_* limit) is a 400 naming response_format."""
    schema, any_object = response_schema(body)
    try:
        return await service.with_grammar(params, schema, any_object)
    except InvalidInputError as exc:
        raise OpenAIError(str(exc), "response_format") from exc


def choice_params(params: SamplingParams, choices: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice i draws from seed + i, so the
    choices differ from each other and each is reproducible."""
    if params.seed is None:
        return [params] * choices
    return [replace(params, seed=params.seed + i) for i in range(choices)]
