"""Special-token text typed by a client is plain text unless the server trusts its clients.

A prompt, a chat message, a tool definition or a tool call's arguments containing `</s>` or
`<|im_start|>system` would otherwise be tokenised as the real control tokens, so a user could
end the sequence or forge a role turn (prompt injection through the template). By default
(GENERATE_SPECIAL_TOKENS_IN_PROMPTS=false) that text is tokenised as the characters it is; only
the chat template's own markers are control tokens.

A chat is rendered and tokenised as one text, exactly as before; only the special tokens that
came from a client's string are then replaced by their plain-text tokens, so a chat without such
text gets the very same ids. To know which ones came from a client, every client string that
holds special-token text (message contents, names, tool-call ids and arguments, tool results,
every key and value of the tool definitions) is rendered once more with that text replaced by
markers no client sent: where the markers land is where the client's text is, however the
template arranges or quotes it (tools are often rendered as JSON).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batching.errors import InvalidInputError

# Private-use code points: no tokenizer gives them meaning, and a marker is checked to be absent
# from everything the client sent before it is used.
_MARKER_CHARS = [chr(code) for code in range(0xE000, 0xE100)]
_MARKER_LENGTH = 6

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


def special_token_texts(tokenizer: Any) -> list[str]:
    """The text of every special token, longest first (so `<|im_start|>` wins over `<|`)."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in texts if t), key=lambda t: (-len(t), t))


def prompt_ids(
    tokenizer: Any, text: str, add_special_tokens: bool, allow_special: bool
) -> list[int]:
    """A prompt's ids; its special-token text stays plain text unless allow_special."""
    ids: list[int] = tokenizer.encode(
        text, add_special_tokens=add_special_tokens, split_special_tokens=not allow_special
    )
    return ids


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat template and where in it a client typed special-token text."""

    text: str
    typed: list[tuple[int, int]] = field(default_factory=list)  # [start, end) character spans


def render_chat(
    tokenizer: Any,
    render: Callable[[Messages, Tools], str],
    messages: Messages,
    tools: Tools,
    allow_special: bool,
) -> RenderedChat:
    """`render(messages, tools)` (the chat template), with the spans of client-typed
    special-token text unless allow_special."""
    text = render(messages, tools)
    specials = special_token_texts(tokenizer)
    if allow_special or not specials:
        return RenderedChat(text)
    typed = re.compile("|".join(re.escape(t) for t in specials))
    sent = list(_strings([messages, tools]))
    if not any(typed.search(s) for s in sent):
        return RenderedChat(text)
    marker = _unused_marker(sent)
    found: list[str] = []  # the special-token text each numbered marker stands for

    def mark(s: str) -> str:
        def numbered(match: re.Match[str]) -> str:
            found.append(match.group())
            return f"{marker}{len(found) - 1}{marker}"

        return typed.sub(numbered, s)

    marked = render(_map_strings(messages, mark), _map_strings(tools, mark))
    restored, spans = _restore(marked, marker, found)
    if restored != text:  # the template changed the markers: we cannot tell its text from theirs
        raise InvalidInputError(
            "messages: special-token text in a field that this chat template rewrites"
        )
    return RenderedChat(text, spans)


def chat_ids(tokenizer: Any, chat: RenderedChat) -> list[int]:
    """The ids of a rendered chat: the template's special tokens stay control tokens, a
    client's special-token text becomes the plain-text tokens it spells."""
    if not chat.typed:
        ids: list[int] = tokenizer.encode(chat.text, add_special_tokens=False)
        return ids
    encoding = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
    special = special_token_ids(tokenizer)
    out: list[int] = []
    for token_id, (start, end) in zip(
        encoding["input_ids"], encoding["offset_mapping"], strict=True
    ):
        if token_id in special and any(start < e and s < end for s, e in chat.typed):
            out += tokenizer.encode(
                chat.text[start:end], add_special_tokens=False, split_special_tokens=True
            )
        else:
            out.append(token_id)
    return out


def _strings(value: Any) -> Iterator[str]:
    """Every string in nested dicts and lists, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {_map_strings(k, change): _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(item, change) for item in value]
    return value


def _unused_marker(sent: Sequence[str]) -> str:
    """A random run of private-use characters that no client string contains."""
    while True:
        marker = "".join(secrets.choice(_MARKER_CHARS) for _ in range(_MARKER_LENGTH))
        if not any(marker in s for s in sent):
            return marker


def _restore(marked: str, marker: str, found: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text with each marker replaced by the text it stands for, and where those
    texts are in it."""
    pattern = re.compile(f"{re.escape(marker)}([0-9]+){re.escape(marker)}")
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length = cursor = 0
    for match in pattern.finditer(marked):
        before = marked[cursor : match.start()]
        typed = found[int(match.group(1))]
        pieces += [before, typed]
        spans.append((length + len(before), length + len(before) + len(typed)))
        length += len(before) + len(typed)
        cursor = match.end()
    pieces.append(marked[cursor:])
    return "".join(pieces), spans
