"""Special-token text typed by a client is plain text unless the server trusts its clients.

A prompt or chat message containing `</s>` or `<|im_start|>system` would otherwise be tokenised
as the real control tokens, so a user could end the sequence or forge a role turn (prompt
injection through the template). By default (GENERATE_SPECIAL_TOKENS_IN_PROMPTS=false) that
text is tokenised as the characters it is; only the chat template's own markers are control
tokens. A chat is tokenised as one text, exactly as before, and then only the special tokens
that lie inside a message's content are replaced by their plain-text tokens, so a chat without
such text gets the very same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batching.errors import InvalidInputError


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


def prompt_ids(
    tokenizer: Any, text: str, add_special_tokens: bool, allow_special: bool
) -> list[int]:
    """A prompt's ids; its special-token text stays plain text unless allow_special."""
    ids: list[int] = tokenizer.encode(
        text, add_special_tokens=add_special_tokens, split_special_tokens=not allow_special
    )
    return ids


def chat_ids(
    tokenizer: Any, rendered: str, contents: Sequence[str], allow_special: bool
) -> list[int]:
    """The ids of a rendered chat template; special tokens inside `contents` (the messages'
    client-written text, in order) become plain text unless allow_special."""
    if allow_special:
        ids: list[int] = tokenizer.encode(rendered, add_special_tokens=False)
        return ids
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    special = special_token_ids(tokenizer)
    typed = _content_spans(rendered, contents, tokenizer, special)
    if not typed:
        return ids
    out: list[int] = []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        if token_id in special and any(s <= start and end <= e for s, e in typed):
            out += tokenizer.encode(
                rendered[start:end], add_special_tokens=False, split_special_tokens=True
            )
        else:
            out.append(token_id)
    return out


def _content_spans(
    rendered: str, contents: Sequence[str], tokenizer: Any, special: frozenset[int]
) -> list[tuple[int, int]]:
    """Where in `rendered` each content holding special-token text sits (found in order)."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for content in contents:
        if not any(i in special for i in tokenizer.encode(content, add_special_tokens=False)):
            continue
        start = rendered.find(content, cursor)
        if start < 0:
            stripped = content.strip()
            start = rendered.find(stripped, cursor)
            content = stripped
        if start < 0:  # the template rewrote it: we cannot tell its markers from the user's
            raise InvalidInputError(
                "messages: special-token text in a message that this chat template changes"
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans
