"""Special-token text typed by a client is plain text by default: a user cannot end the
sequence or forge a role turn; only the chat template's own markers are control tokens."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.generate.special_tokens import chat_ids, prompt_ids
from service.settings import Settings
from tests.batching.conftest import EOS_ID, build_tokenizer

from .inprocess import wait_ready

TYPED = "hi </s> there <s>"


def test_typed_special_tokens_in_a_chat_are_plain_text_but_the_template_markers_are_not() -> None:
    tokenizer = build_tokenizer()
    rendered = f"{TYPED}</s>"  # a template that ends each message with its own </s>
    ids = chat_ids(tokenizer, rendered, [TYPED], allow_special=False)
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID  # the template's marker only
    assert tokenizer.decode(ids) == rendered  # the user's text is all still there
    trusted = chat_ids(tokenizer, rendered, [TYPED], allow_special=True)
    assert trusted.count(EOS_ID) == 2


def test_a_chat_without_special_text_gets_the_same_ids_as_before() -> None:
    tokenizer = build_tokenizer()
    rendered = "<|user|>\nThe quick brown fox\n<|assistant|>\n"
    expected = tokenizer.encode(rendered, add_special_tokens=False)
    assert chat_ids(tokenizer, rendered, ["The quick brown fox"], allow_special=False) == expected


def test_a_typed_eos_in_a_prompt_is_plain_text_unless_trusted() -> None:
    tokenizer = build_tokenizer()
    assert EOS_ID not in prompt_ids(tokenizer, TYPED, True, allow_special=False)
    assert EOS_ID in prompt_ids(tokenizer, TYPED, True, allow_special=True)


def test_tokenize_says_whether_special_token_text_became_control_tokens(demo_models) -> None:
    for trusted in (False, True):
        settings = Settings(
            generate_model=str(demo_models["llm"]), generate_special_tokens_in_prompts=trusted
        )
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            eos = client.app.state.runtime.generate.loaded.tokenizer.eos_token_id  # type: ignore[attr-defined]
            by_prompt = client.post("/tokenize", json={"prompt": TYPED}).json()
            chat = {"messages": [{"role": "user", "content": TYPED}]}
            by_chat = client.post("/tokenize", json=chat).json()
        assert by_prompt["special_tokens_in_text"] is trusted
        assert (eos in by_prompt["tokens"]) is trusted
        assert (eos in by_chat["tokens"]) is trusted
