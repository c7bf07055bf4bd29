"""The servers we compare against, each a small app launched as its own process.

    python scripts/bench/bench_peers.py floor    --port P
    python scripts/bench/bench_peers.py naive    --port P --predict-model DIR --generate-model DIR
    python scripts/bench/bench_peers.py litserve --port P --predict-model DIR [--max-batch-size 32]

* floor: the same web stack as ours (FastAPI + uvicorn, pydantic bodies, SSE framing) answering
  without any model. Its throughput bounds what any server on this stack can reach.
* naive: FastAPI calling the model once per request: a sync /predict (FastAPI runs it in its
  thread pool) and /generate as `model.generate()` per request in its own thread, streamed
  through a `BaseStreamer`, the pattern of the transformers docs.
* litserve: LitServe with its own dynamic batching (see bench_litserve.py).

/generate bodies and SSE events have our shape, so one client measures all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

FLOOR_TOKENS = 64  # tokens the floor streams when a request asks for none


class PredictBody(BaseModel):
    text: str


class GenerateBody(BaseModel):
    prompt: str
    max_new_tokens: int = FLOOR_TOKENS
    temperature: float = 0.0
    stream: bool = True


def sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def final_events(prompt_tokens: int, completion_tokens: int) -> list[str]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return [sse({"text": "", "finish_reason": "length", "usage": usage}), sse("[DONE]")]


def classify(model: Any, tokenizer: Any, texts: list[str]) -> list[dict[str, Any]]:
    """One padded forward over `texts`; label, score and scores per text."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        probs = model(**encoded).logits.float().softmax(dim=-1).tolist()  # [B, labels]
    labels = model.config.id2label
    results = []
    for row in probs:
        best = max(range(len(row)), key=row.__getitem__)
        scores = {labels[i]: p for i, p in enumerate(row)}
        results.append({"label": labels[best], "score": row[best], "scores": scores})
    return results


def floor_app() -> FastAPI:
    app = FastAPI()
    answer = {"label": "POSITIVE", "score": 0.5, "scores": {"NEGATIVE": 0.5, "POSITIVE": 0.5}}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(body: PredictBody) -> dict[str, Any]:
        return answer | {"model": "none", "request_id": "floor"}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(body.max_new_tokens):
                yield sse({"text": " tok", "token_ids": [i]})
            for event in final_events(len(body.prompt.split()), body.max_new_tokens):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class QueueStreamer:
    """A transformers streamer that hands each new token id to an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def naive_app(predict_model: str, generate_model: str) -> FastAPI:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    app = FastAPI()
    clf = clf_tok = llm = llm_tok = None
    if predict_model:
        clf_tok = AutoTokenizer.from_pretrained(predict_model)
        clf = AutoModelForSequenceClassification.from_pretrained(predict_model).eval()
    if generate_model:
        llm_tok = AutoTokenizer.from_pretrained(generate_model)
        llm = AutoModelForCausalLM.from_pretrained(generate_model).eval()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: PredictBody) -> dict[str, Any]:  # sync: FastAPI's thread pool runs it
        return classify(clf, clf_tok, [body.text])[0]

    @app.post("/generate")
    async def generate(body: GenerateBody) -> StreamingResponse:
        assert llm is not None and llm_tok is not None  # bench-only server
        queue: asyncio.Queue[Any] = asyncio.Queue()
        encoded = llm_tok(body.prompt, return_tensors="pt")
        kwargs = dict(encoded, max_new_tokens=body.max_new_tokens, do_sample=False)
        kwargs |= {"streamer": QueueStreamer(asyncio.get_running_loop(), queue)}
        threading.Thread(target=_generate, args=(llm, kwargs), daemon=True).start()

        async def events() -> AsyncIterator[str]:
            count = 0
            while (ids := await queue.get()) is not None:
                count += len(ids)
                yield sse({"text": llm_tok.decode(ids), "token_ids": ids})
            for event in final_events(encoded["input_ids"].shape[1], count):
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _generate(model: Any, kwargs: dict[str, Any]) -> None:
    with torch.inference_mode():
        model.generate(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["floor", "naive", "litserve"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--predict-model", default="")
    parser.add_argument("--generate-model", default="")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.kind == "litserve":  # its own module: LitServe pickles the API into a worker
        from bench_litserve import run_litserve

        run_litserve(args.port, args.predict_model, args.max_batch_size, args.max_wait_ms / 1000)
        return 0
    if args.kind == "floor":
        app = floor_app()
    else:
        app = naive_app(args.predict_model, args.generate_model)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
