"""The LitServe peer for /predict: its own dynamic batching at our max batch size and wait.

Started by `bench_peers.py litserve`. The API class lives at module level because LitServe
pickles it into its inference worker process. Configured as LitServe recommends for speed:
`fast_queue=True` (zmq between the API server and the worker), one worker, one API server.
"""

from __future__ import annotations

from typing import Any

import litserve as ls
from bench_peers import classify


class ClassifierAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path

    def setup(self, device: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForSequenceClassification.from_pretrained(self.model_path)
        self.model = model.eval()

    # Unannotated on purpose: LitServe reads the annotation as the endpoint's body type, and
    # then a `dict[str, Any]` string annotation (postponed evaluation) turns into a 422.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return str(request["text"])

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        return classify(self.model, self.tokenizer, texts)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def run_litserve(port: int, model_path: str, max_batch_size: int, batch_timeout_s: float) -> None:
    api = ClassifierAPI(model_path, max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )
