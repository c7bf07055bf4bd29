"""Load models once, through the Auto* classes, with optional bitsandbytes quantization."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.settings import Settings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; the process must not start half-alive."""


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts /info and model_info report about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    revision: str
    task: str  # "classification" | "embedding" | "generation"
    device: torch.device
    dtype: torch.dtype
    quantization: str
    load_seconds: float

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but torch sees no CUDA device")
    return torch.device(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and bandwidth on GPUs; CPU kernels are fastest and exact in fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# Output heads stay in full precision: they are a tiny share of the weights, their outputs are
# what the user sees, and a 2-label head cannot be packed by the 4-bit CPU kernels at all.
UNQUANTIZED_HEADS = ["lm_head", "classifier", "score", "pre_classifier"]


def quantization_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_HEADS)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=UNQUANTIZED_HEADS,
        )
    return None


def _silence_bitsandbytes_cpu_warnings() -> None:
    # On CPU bitsandbytes logs a warning for every fp32 matmul; that would flood the log.
    for name in ("bitsandbytes", "bitsandbytes.nn.modules", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _load(
    auto_class: Any, name: str, revision: str, settings: Settings, task: str, **kwargs: Any
) -> LoadedModel:
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = compute_dtype(device)
    quant = quantization_config(settings.quantization, dtype)
    if quant is not None:
        _silence_bitsandbytes_cpu_warnings()
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = auto_class.from_pretrained(name, revision=revision, dtype=dtype, **kwargs)
    except Exception as exc:  # any failure here is fatal by design: say which model and why
        raise ModelLoadError(f"could not load {task} model {name!r}@{revision}: {exc}") from exc
    if quant is None:
        model.to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        revision=revision,
        task=task,
        device=device,
        dtype=dtype,
        quantization=settings.quantization,
        load_seconds=time.perf_counter() - started,
    )


def load_predict_model(settings: Settings) -> LoadedModel:
    """A sequence classifier if the config says so, else an encoder used for embeddings."""
    name, revision = settings.predict_model, settings.predict_model_revision
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {name!r}@{revision}: {exc}") from exc
    architectures = getattr(config, "architectures", None) or []
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return _load(AutoModelForSequenceClassification, name, revision, settings, "classification")
    return _load(AutoModel, name, revision, settings, "embedding")


def load_generate_model(settings: Settings) -> LoadedModel:
    if resolve_device(settings.device).type == "cuda":
        # cuDNN attention builds a plan per new shape, and continuous batching changes shapes
        # every step (see batching/model_runner.py); flash / mem-efficient attention do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    loaded = _load(
        AutoModelForCausalLM,
        settings.generate_model,
        settings.generate_model_revision,
        settings,
        "generation",
        attn_implementation=settings.attn_implementation,
    )
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded
