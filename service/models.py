"""Load models once, through the Auto* classes, with optional bitsandbytes quantization."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
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

from batching.generation.memory import config_context
from batching.generation.model_support import UnsupportedModelError, refusal_reason
from service.model_versions import (
    ModelVersion,
    RevisionMismatchError,
    describe_cache,
    resolve_version,
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
    version: ModelVersion  # the immutable version loaded (see service/model_versions.py)
    task: str  # "classification" | "embedding" | "generation"
    device: torch.device
    dtype: torch.dtype
    quantization: str
    load_seconds: float

    @property
    def revision(self) -> str:
        """What /info, model_info, X-Model-Revision and the log call the model's revision."""
        return self.version.revision

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


def hub_cache() -> Path:
    # Read when called, not at import: HF_HOME / HF_HUB_CACHE are the process's environment.
    return Path(hub_constants.HF_HUB_CACHE)


def version_before_load(name: str, requested: str) -> ModelVersion | None:
    """The version to load, or None: a hub model not in the cache yet, which the load
    downloads. Offline, a model or revision that is not on disk is fatal, said clearly."""
    try:
        version = resolve_version(name, requested, hub_cache())
    except RevisionMismatchError as exc:
        raise ModelLoadError(str(exc)) from exc
    if version is None and hub_constants.is_offline_mode():
        raise ModelLoadError(
            f"{name}@{requested} is not on disk and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded: {describe_cache(hub_cache(), name)}"
        )
    return version


def version_after_download(name: str, requested: str) -> ModelVersion:
    version = resolve_version(name, requested, hub_cache())
    if version is None:
        raise ModelLoadError(
            f"{name}@{requested} was loaded but is not in the cache at {hub_cache()}: "
            f"{describe_cache(hub_cache(), name)}"
        )
    return version


def revision_to_load(version: ModelVersion | None, requested: str) -> str:
    # A hub model loads at the resolved commit: what is reported is exactly what was loaded.
    return version.revision if version and version.source == "hub-cache" else requested


def _load(
    auto_class: Any,
    name: str,
    requested: str,
    version: ModelVersion | None,
    settings: Settings,
    task: str,
    **kwargs: Any,
) -> LoadedModel:
    started = time.perf_counter()
    revision = revision_to_load(version, requested)
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
        version=version or version_after_download(name, requested),
        task=task,
        device=device,
        dtype=dtype,
        quantization=settings.quantization,
        load_seconds=time.perf_counter() - started,
    )


def load_predict_model(settings: Settings) -> LoadedModel:
    """A sequence classifier if the config says so, else an encoder used for embeddings."""
    name, requested = settings.predict_model, settings.predict_model_revision
    version = version_before_load(name, requested)
    revision = revision_to_load(version, requested)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {name!r}@{revision}: {exc}") from exc
    architectures = getattr(config, "architectures", None) or []
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        classifier = AutoModelForSequenceClassification
        return _load(classifier, name, requested, version, settings, "classification")
    return _load(AutoModel, name, requested, version, settings, "embedding")


def refuse_before_loading(name: str, revision: str, settings: Settings) -> None:
    """A model the engine cannot serve is refused from its config, before its weights load
    (the engine checks again, and checks its paths at warm-up: model_support.py)."""
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except Exception:
        return  # the load says why, with its own error
    # Unset: the model's context, what the engine defaults to; the pool may cap it further,
    # and the engine checks again with the length it serves.
    reason = refusal_reason(config, settings.generate_max_seq_len or config_context(config))
    if reason is not None:
        raise UnsupportedModelError(reason)


def attn_implementation_of(model: PreTrainedModel) -> str:
    """The attention kernels the model runs ("sdpa", "eager"), without the engine's prefix."""
    return str(model.config._attn_implementation).removeprefix("slots+")


def load_generate_model(settings: Settings) -> LoadedModel:
    if resolve_device(settings.device).type == "cuda":
        # cuDNN attention builds a plan per new shape, and continuous batching changes shapes
        # every step (see batching/model_runner.py); flash / mem-efficient attention do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    name, requested = settings.generate_model, settings.generate_model_revision
    version = version_before_load(name, requested)
    refuse_before_loading(name, revision_to_load(version, requested), settings)
    loaded = _load(
        AutoModelForCausalLM,
        name,
        requested,
        version,
        settings,
        "generation",
        # None: transformers picks sdpa where the model supports it, else eager (auto)
        attn_implementation=None
        if settings.attn_implementation == "auto"
        else settings.attn_implementation,
    )
    log.info(
        "generation attention: %s (ATTN_IMPLEMENTATION=%s)",
        attn_implementation_of(loaded.model),
        settings.attn_implementation,
    )
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded
