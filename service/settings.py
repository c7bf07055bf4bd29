"""The one Settings object: read from the environment (and `.env`), built in create_app()."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batching.priority import PRIORITY_MAX, PRIORITY_MIN

PLACEHOLDER_API_KEY = "replace-me-before-deploying"


class Settings(BaseSettings):
    """Every knob of the service. `.env.example` lists each field with its default."""

    # hide_input_in_errors: a bad API_KEYS or API_KEY_PRIORITIES must not print the keys into
    # the start-up log (a crash-looping pod's log is read by more people than its secrets).
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    predict_model: str = Field("", description="Hub id or local path; empty disables /predict")
    predict_model_revision: str = Field("main", description="Pinned revision of PREDICT_MODEL")
    generate_model: str = Field("", description="Hub id or local path; empty disables /generate")
    generate_model_revision: str = Field("main", description="Pinned revision of GENERATE_MODEL")
    quantization: Literal["none", "int8", "nf4"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernels of the generation model; auto: sdpa where the model "
        "supports it, else eager",
    )

    predict_max_batch_size: int = Field(32, ge=1, le=1024)
    predict_max_batch_tokens: int = Field(
        8192,
        ge=0,
        description="Most padded tokens (texts x longest) in one batch; a longer text runs "
        "alone; 0 = count only",
    )
    predict_max_group_padding_tokens: int = Field(
        64,
        ge=0,
        description="A length-sorted batch runs as groups, each padded to its own longest "
        "text, with at most this much padding per group",
    )
    predict_max_wait_ms: float = Field(
        5.0, ge=0, description="Longest wait for more texts, only while traffic makes it pay"
    )
    predict_max_queue: int = Field(4096, ge=1)
    predict_cache_size: int = Field(
        0, ge=0, description="Results kept in the in-process response cache; 0 = off"
    )
    predict_cache_ttl_s: float = Field(
        300.0, ge=0, description="Seconds a cached result may be served; 0 = no expiry"
    )
    predict_cache_shared: bool = Field(
        False, description="One cache for every API key (else one per key: none sees another's)"
    )
    max_input_chars: int = Field(2000, ge=1)
    max_batch_texts: int = Field(64, ge=1)
    embeddings_max_inputs: int = Field(
        2048, ge=1, description="Most inputs in one /v1/embeddings call (OpenAI's limit)"
    )

    generate_slots: int = Field(16, ge=1)
    generate_max_seq_len: int | None = Field(
        None, ge=8, description="Longest sequence; unset = the model's context, capped by the pool"
    )
    generate_max_new_tokens: int = Field(
        4096,
        ge=1,
        description="Operator cap on new tokens per request; below it, what fits the context "
        "after the prompt is the limit (and the default)",
    )
    generate_max_queue: int = Field(256, ge=1)
    generate_max_prompt_chars: int = Field(8000, ge=1)
    generate_max_messages: int = Field(256, ge=1, description="Most chat messages per request")
    # false only on a shadow behind NGINX `mirror`, which hangs up on the shadow's streams
    generate_cancel_on_disconnect: bool = True
    # decode steps replay CUDA graphs (captured at warm-up); auto = on where CUDA is available
    generate_cuda_graphs: Literal["auto", "on", "off"] = "auto"
    generate_paged_attention: Literal["auto", "gather", "in_place"] = Field(
        "auto",
        description="How decode attention reads KV blocks: gather (a copy, every device), "
        "in_place (FlexAttention); auto = in_place on CUDA once it matches gather at warm-up",
    )
    generate_prefill_chunk_tokens: Annotated[int, Field(ge=16)] | Literal["auto"] = Field(
        "auto",
        description="Most prompt tokens prefilled per step while streams decode; auto = "
        "measured at warm-up",
    )
    generate_max_stall_steps: float = Field(
        4.0,
        ge=1.0,
        description="Longest step while streams decode and requests wait, in decode steps of "
        "a full batch (auto chunk limits are measured against it)",
    )
    # a step's prefill runs inside the decode forward (one mixed batch) while streams decode
    generate_mixed_steps: bool = True
    generate_max_prompts: int = Field(
        64, ge=1, description="Most prompts in one /v1/completions call, each with its n choices"
    )
    generate_tool_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="How tool calls are read from the output; auto: from the template"
    )
    generate_max_choices: int = Field(
        4, ge=1, description="Most choices (OpenAI's n) per request; each takes a slot"
    )
    generate_prefix_cache_tokens: int = Field(
        0,
        ge=0,
        description="> 0 turns the prefix cache on (cached blocks live in free KV blocks, "
        "so the number itself no longer bounds anything); 0 = off",
    )
    generate_kv_block_size: int = Field(16, ge=1, description="Token positions per KV block")
    generate_kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="KV block pool size; unset = gpu_memory_utilization on CUDA, 256 MiB on CPU",
    )
    generate_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="CUDA: share of device memory for weights, peak and KV"
    )
    generate_prefix_cache_shared: bool = Field(
        False,
        description="One prefix cache for every API key (else one per key: cached_tokens never "
        "tells a key about another's prompts)",
    )
    generate_special_tokens_in_prompts: bool = Field(
        False,
        description="Special-token text in prompts and chat contents (</s>, <|im_start|>) "
        "becomes control tokens (trusted clients only); else it is plain text",
    )
    grammar_max_bytes: int = Field(
        65_536, ge=256, description="Largest grammar (a JSON schema's, nearly its size) compiled"
    )
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="Longest compile of one grammar (then 400/422 naming the schema)"
    )
    grammar_compile_memory_mb: int = Field(
        1024, ge=128, description="Address space of a grammar-compile worker process"
    )
    grammar_compile_workers: int = Field(2, ge=1, description="Grammar compiles run at once")
    grammar_cache_size: int = Field(
        128, ge=0, description="Compiled (and refused) grammars kept, by schema"
    )

    request_timeout_s: float = Field(30.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    drain_quiet_s: float = Field(
        1.0, ge=0, description="A drain also waits until no request arrived for this long"
    )
    engine_step_timeout_s: float = Field(
        60.0, gt=0, description="/health is 503 while one model step runs longer than this"
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the app reads (413 beyond)"
    )
    # Longer than every proxy's idle timeout for upstream connections (NGINX: 60 s), so the
    # proxy always closes an idle connection first and never sends on one uvicorn just closed.
    keep_alive_timeout_s: int = Field(75, ge=1)
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="Proxies whose X-Forwarded-For names the client (uvicorn): NGINX's own "
        "address, never '*' where clients reach the app directly",
    )
    forwarded_trusted_hops: int = Field(
        0,
        ge=0,
        description="X-Forwarded-For entries, from the right, that our own proxies append (an "
        "Envoy-based gateway: 1): the client is the leftmost of them, what a client wrote before "
        "them is ignored. 0: uvicorn's rule alone (for proxies that replace the header, as NGINX "
        "here does)",
    )
    api_keys: str = Field(
        "", description="Comma-separated accepted keys; empty leaves the API open"
    )
    api_key_priorities: str = Field(
        "",
        description="Comma-separated key=priority: the most urgent a key's requests may be "
        "(e.g. batchkey=10); other keys and an open API: 0",
    )
    priority_aging_s: float = Field(
        5.0, gt=0, description="A waiting request's priority improves by 1 per this many seconds"
    )
    rate_limit: str = Field(
        "600/minute", description="slowapi limit per configured API key, else per client IP"
    )
    cors_origins: str = Field("", description="Comma-separated allowed origins; empty = CORS off")
    log_level: str = "INFO"
    audit_log: str = Field(
        "", description="One JSON line per work request to this file, or 'stdout'; empty = off"
    )
    audit_log_content: bool = Field(
        False, description="Also log inputs and outputs (personal data: off by default)"
    )
    audit_log_max_bytes: int = Field(100 * 2**20, ge=1024, description="Rotate beyond this")
    audit_log_backups: int = Field(5, ge=0, description="Rotated files kept")

    @field_validator("api_key_priorities")
    @classmethod
    def _key_priorities_parse(cls, value: str) -> str:
        items = [item.strip() for item in value.split(",") if item.strip()]
        for position, item in enumerate(items, start=1):  # messages name it, never the key
            key, _, number = item.partition("=")
            if not key.strip() or not number.strip().lstrip("-").isdigit():
                raise ValueError(f"item {position}: expected key=priority")
            if not PRIORITY_MIN <= int(number) <= PRIORITY_MAX:
                raise ValueError(
                    f"item {position}: priority {number.strip()} is not in "
                    f"[{PRIORITY_MIN}, {PRIORITY_MAX}]"
                )
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_key(cls, value: str) -> str:
        # deploy/kubernetes ships api-keys.env.example with this value: a deployment that
        # forgot to replace it must not start with a key everyone can read on GitHub.
        if PLACEHOLDER_API_KEY in (k.strip() for k in value.split(",")):
            raise ValueError(
                f"API_KEYS still holds the placeholder {PLACEHOLDER_API_KEY!r} from "
                "deploy/kubernetes/base/api-keys.env.example; set real keys"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _upper_log_level(cls, value: str) -> str:
        return value.upper()

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def key_priorities(self) -> dict[str, int]:
        pairs = (item.split("=", 1) for item in self.api_key_priorities.split(",") if "=" in item)
        return {key.strip(): int(value) for key, value in pairs}

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
