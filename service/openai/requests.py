"""decode_request for /v1: an OpenAI request -> a GenerationCall (generate/submit.py): prompt
token ids (chat template, with the tools, or raw prompts), SamplingParams with OpenAI's
defaults, the JSON the output must be; refusing what this server cannot honour."""

from __future__ import annotations

import json
from typing import Any, cast

from jinja2 import TemplateError

from batching.errors import InvalidInputError
from batching.generation.sampling import SamplingParams
from service.generate.grammars import JsonOutput
from service.generate.limits import FieldError, checked_conversation_size, checked_text
from service.generate.service import GenerationService
from service.generate.special_tokens import chat_ids, render_chat
from service.generate.submit import GenerationCall
from service.openai.errors import OpenAIError
from service.openai.schemas import ChatMessage, CompletionRequest, SamplingRequest


def reject_unsupported(body: SamplingRequest) -> None:
    for param, value in body.unsupported().items():
        raise OpenAIError(f"{param}={value!r} is not supported by this server", param)


def checked_conversation(
    messages: list[ChatMessage], tools: list[dict[Any, Any]] | None, service: GenerationService
) -> list[dict[str, Any]]:
    """The messages as template input, within the limits (tool definitions and the
    assistant's tool-call arguments count as text: the template renders them too)."""
    conversation = [message.for_template() for message in messages]
    chars = sum(len(message["content"]) for message in conversation)
    chars += sum(len(json.dumps(m["tool_calls"])) for m in conversation if "tool_calls" in m)
    chars += len(json.dumps(tools)) if tools else 0
    checked_conversation_size(len(messages), chars, service.settings)
    return conversation


def chat_prompt_ids(
    messages: list[ChatMessage],
    service: GenerationService,
    tools: list[dict[Any, Any]] | None = None,
) -> list[int]:
    tokenizer = service.loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError("the served model has no chat template: use /v1/completions", None)
    conversation = checked_conversation(messages, tools, service)

    def render(conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        text = tokenizer.apply_chat_template(
            conversation, tools=cast(Any, tools), add_generation_prompt=True, tokenize=False
        )
        return str(text)

    allow = service.settings.generate_special_tokens_in_prompts
    try:
        chat = render_chat(tokenizer, render, conversation, tools, allow)
    except TemplateError as exc:  # templates raise on conversations they refuse
        raise OpenAIError(f"messages: {exc}", "messages") from exc
    except InvalidInputError as exc:
        raise OpenAIError(str(exc), "messages") from exc
    # The template writes any special tokens (BOS, role markers) itself: add none twice.
    checked_text(chat.text, "messages", service.settings)
    return chat_ids(tokenizer, chat)


def completion_prompts(body: CompletionRequest, service: GenerationService) -> list[list[int]]:
    """Each prompt's token ids: a text, a list of texts, a token list, or a list of them.
    Token ids are the model's own (the engine checks their range)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [service.encode(checked_text(prompt, "prompt", service.settings))]
    if not prompt:
        raise OpenAIError("prompt: an empty list; give at least one prompt", "prompt")
    if isinstance(prompt[0], int):
        return [[int(token) for token in cast(list[int], prompt)]]
    if isinstance(prompt[0], str):
        texts = cast(list[str], prompt)
        return [service.encode(checked_text(text, "prompt", service.settings)) for text in texts]
    return [list(ids) for ids in cast(list[list[int]], prompt)]


def response_output(body: SamplingRequest) -> JsonOutput | None:
    """The JSON a chat request's response_format asks for, if any."""
    form = getattr(body, "response_format", None)
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return JsonOutput(None, "response_format")
    if form.json_schema is None or form.json_schema.json_schema is None:
        raise OpenAIError("response_format: json_schema.schema is required", "response_format")
    return JsonOutput(form.json_schema.json_schema, "response_format")


def logit_bias(body: SamplingRequest, service: GenerationService) -> tuple[tuple[int, float], ...]:
    biases = tuple((int(token), bias) for token, bias in (body.logit_bias or {}).items())
    vocab = service.vocab_size
    for token, _ in biases:
        if token >= vocab:
            raise FieldError("logit_bias", f"token id {token} is not in [0, {vocab})")
    return biases


def sampling(
    body: SamplingRequest, service: GenerationService, prompt_logprobs: int | None = None
) -> SamplingParams:
    """OpenAI's defaults: temperature 1, top_p 1 (0 is greedy)."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # keeping only the most likely token is greedy decoding
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            max_new_tokens=1,  # the submit path sets the real one per prompt
            temperature=temperature,
            top_p=top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=tuple(body.stop_list),
            ignore_eos=bool(body.ignore_eos),
            logprobs=body.top_logprobs_asked(),
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias(body, service),
            min_tokens=body.min_tokens or 0,
            stop_token_ids=tuple(body.stop_token_ids or ()),
        )
    except InvalidInputError as exc:
        raise OpenAIError(str(exc), None) from exc


def generation_call(
    body: SamplingRequest,
    prompts: list[list[int]],
    service: GenerationService,
    prompt_param: str,
    json_output: JsonOutput | None,
    echo: bool = False,
) -> GenerationCall:
    param, max_tokens = body.requested_max_tokens()
    # Echo with logprobs scores the prompt too (lm-evaluation-harness's loglikelihood).
    prompt_logprobs = body.top_logprobs_asked() if echo else None
    return GenerationCall(
        prompts=prompts,
        sampling=sampling(body, service, prompt_logprobs),
        max_new_tokens=max_tokens,
        json_output=json_output,
        choices=body.choices,
        priority=body.priority,
        allow_zero_tokens=echo,
        max_tokens_param=param,
        prompt_param=prompt_param,
    )
