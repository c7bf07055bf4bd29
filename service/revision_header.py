"""X-Model-Revision on every response of a model route: which exact model answered.

The value is the immutable version the model resolved to at load (a hub commit or a local
folder's content hash, see service/model_versions.py), on answers and errors alike, so a
client or a log line can always tell which revision served it, canary or not. While the
models load there is none yet, and no header.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Model-Revision"
# Path prefix -> the model that serves it; the first match wins.
MODEL_ROUTES = (
    ("/predict", "predict"),
    ("/v1/embeddings", "predict"),  # on the /predict path
    ("/generate", "generate"),
    ("/v1/", "generate"),
    ("/tokenize", "generate"),
    ("/detokenize", "generate"),
)


def model_of(path: str) -> str | None:
    return next((model for prefix, model in MODEL_ROUTES if path.startswith(prefix)), None)


class ModelRevisionMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = model_of(scope["path"]) if scope["type"] == "http" else None
        if model is None:
            await self.app(scope, receive, send)
            return

        async def send_with_revision(message: Message) -> None:
            if message["type"] == "http.response.start":
                service = getattr(scope["app"].state.runtime, model)
                if service is not None:
                    MutableHeaders(scope=message)[HEADER] = service.loaded.revision
            await send(message)

        await self.app(scope, receive, send_with_revision)
