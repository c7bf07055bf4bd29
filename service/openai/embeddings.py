"""POST /v1/embeddings: OpenAI's embeddings API on the /predict path.

Each input becomes one item of the same dynamic batcher (and response cache) as /predict, so
embedding calls batch with each other and with /predict traffic. Inputs are what OpenAI
accepts: a string, a list of strings, a list of token ids or a list of such lists. Token ids
are in the served model's own vocabulary (as vLLM and TEI read them), wrapped in the model's
special tokens like a text. The vectors are the ones /predict returns: mean-pooled over real
tokens, L2-normalised. `encoding_format: "base64"` (what the openai SDK asks for when the caller
names none) is the little-endian float32 bytes of each vector, base64-encoded, as OpenAI sends.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal, cast

from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.deps import PredictServiceDep, SettingsDep
from service.openai.errors import OpenAIError
from service.openai.router import v1_router
from service.predict.answers import answer_inputs, audit_answers
from service.predict.predictor import Embedding, ModelInput
from service.predict.service import PredictService
from service.schemas import Priority
from service.settings import Settings

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
EmbeddingInput = str | list[str] | TokenIds | list[TokenIds]

router = v1_router()


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: EmbeddingInput = Field(
        description="A text, a list of texts, a list of token ids, or a list of token-id lists"
    )
    model: str = Field("", description="Any value is accepted: the served model answers")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Only the model's own size")
    user: str | None = Field(None, description="Accepted and ignored")
    priority: Priority = None  # vLLM's extra field


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def model_inputs(body: EmbeddingRequest, settings: Settings) -> list[ModelInput]:
    """The request's inputs as texts and token-id tuples, within EMBEDDINGS_MAX_INPUTS inputs
    of at most MAX_INPUT_CHARS characters (or token ids) each."""
    raw = body.input
    inputs: list[ModelInput]
    if isinstance(raw, str):
        inputs = [raw]
    elif raw and isinstance(raw[0], int):  # one token-id list
        inputs = [tuple(cast(list[int], raw))]
    else:  # texts, or token-id lists (pydantic allows no mix within one of these)
        items = cast(list[str | list[int]], raw)
        inputs = [x if isinstance(x, str) else tuple(x) for x in items]
    if not inputs:
        raise OpenAIError("input: an empty list; give at least one input", "input")
    # Queued whole or not at all: more than the queue can ever hold could never be served.
    limit = min(settings.embeddings_max_inputs, settings.predict_max_queue)
    if len(inputs) > limit:
        name = (
            "EMBEDDINGS_MAX_INPUTS"
            if limit == settings.embeddings_max_inputs
            else "PREDICT_MAX_QUEUE"
        )
        raise OpenAIError(
            f"input: {len(inputs)} items, more than the limit of {limit} ({name}); "
            "send them in smaller requests",
            "input",
        )
    for i, model_input in enumerate(inputs):
        if isinstance(model_input, str) and not model_input:
            raise OpenAIError(f"input.{i}: an empty string", "input")
        # MAX_INPUT_CHARS bounds token ids too (a token is at least one character): they are
        # validated one by one and keyed whole in the response cache.
        if len(model_input) > settings.max_input_chars:
            unit = "characters" if isinstance(model_input, str) else "token ids"
            raise OpenAIError(
                f"input.{i}: {len(model_input)} {unit}, more than the limit of "
                f"{settings.max_input_chars} (MAX_INPUT_CHARS)",
                "input",
            )
    return inputs


def check_embedding_model(service: PredictService, body: EmbeddingRequest) -> None:
    """Refuse what this model cannot do."""
    if service.loaded.task != "embedding":
        raise OpenAIError(
            "/v1/embeddings needs an embedding model; PREDICT_MODEL is a classifier "
            "(use /predict for its labels)",
            "model",
            "model_not_supported",
            status=404,
        )
    size = getattr(service.loaded.model.config, "hidden_size", None)  # the pooled vector's
    if body.dimensions is not None and size is not None and body.dimensions != size:
        raise OpenAIError(
            f"dimensions: this model's embeddings have {size} dimensions and cannot be "
            f"shortened to {body.dimensions} (omit the field or send {size})",
            "dimensions",
        )


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(
    body: EmbeddingRequest,
    request: Request,
    response: Response,
    service: PredictServiceDep,
    settings: SettingsDep,
) -> EmbeddingResponse:
    check_embedding_model(service, body)
    inputs = model_inputs(body, settings)
    answers = await answer_inputs(service, inputs, body.priority, request, response, settings)
    audit_answers(request, answers)
    data = []
    for index, answer in enumerate(answers):
        assert isinstance(answer.prediction, Embedding)  # checked: an embedding model
        size = len(answer.prediction.embedding)
        if body.dimensions is not None and body.dimensions != size:  # a config without hidden_size
            raise OpenAIError(f"dimensions: this model's embeddings have {size}", "dimensions")
        data.append(
            EmbeddingData(
                index=index, embedding=encoded(answer.prediction.embedding, body.encoding_format)
            )
        )
    tokens = sum(answer.tokens for answer in answers)
    return EmbeddingResponse(
        data=data,
        model=service.loaded.name,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
