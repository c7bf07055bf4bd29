"""Token ids in, text pieces out: never half a character, never (part of) a stop string, never
a special token or a control character.

Two holds keep the stream honest:
* UTF-8: a byte-level token can end in the middle of a multi-byte character; the tokenizer then
  decodes it as U+FFFD. Text that ends in U+FFFD is held until the next token completes it.
* Stop strings and special tokens: either can span tokens, so the longest tail of the text that
  is a prefix of one of them is held until it either completes (a stop string ends generation
  there and is never returned; a special token's text is dropped) or stops matching (then it is
  released).

Sanitising: special token ids are skipped when decoding, the *text* of a special token spelled
out by ordinary tokens (e.g. "<|im_end|>" byte by byte) is removed, since a client that pastes
the output into its next prompt would otherwise inject a real role marker, and so are control
characters other than newline and tab (terminal escapes, NUL, carriage returns).

Decoding uses a short window of ids (the vLLM/TGI "prefix/read offset" trick), so each token costs
O(1) tokenizer work however long the output grows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4  # prompt tail decoded with the output, see __init__
# C0 and C1 control characters and DEL, except tab (\x09) and newline (\x0a).
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Tokenizer(Protocol):
    """The one tokenizer method the engine needs (any transformers tokenizer has it)."""

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = ...,
        clean_up_tokenization_spaces: bool | None = ...,
    ) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas; watches for its stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        special_tokens: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._special = tuple(t for t in special_tokens if t)
        self._held_for = self._stop + self._special  # tails that may still become one of these
        # Some tokenizers (SentencePiece) drop the leading space of a text's first token, so a
        # few prompt tokens are decoded along with the output and their text is cut off again.
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt that ends mid-character would corrupt the offsets
        self._ids: list[int] = context
        self._prefix_offset = 0  # ids[prefix:read] decode to text that was already returned
        self._read_offset = len(context)
        self._held = ""  # decoded text not yet returned: a possible start of a stop string
        self.text = ""  # everything returned so far
        self.stopped = False  # a stop string was found; the caller finishes with "stop"

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete character: wait for more bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new_text[len(prefix_text) :])

    def finish(self) -> str:
        """Generation ended (EOS or length): return whatever is still held back."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        pending = self._scrub(self._held + self._clean(tail[len(prefix_text) :]))
        self._held = ""
        self._read_offset = self._prefix_offset = len(self._ids)
        self.text += pending
        return pending

    def _release(self, piece: str) -> str:
        text = self._scrub(self._held + self._clean(piece))
        if not self._held_for:
            self.text += text
            return text
        cut = _first_stop_index(text, self._stop)
        if cut is not None:
            self.stopped = True
            self._held = ""
            self.text += text[:cut]
            return text[:cut]
        keep = _held_tail_length(text, self._held_for)
        released, self._held = text[: len(text) - keep], text[len(text) - keep :]
        self.text += released
        return released

    @staticmethod
    def _clean(piece: str) -> str:
        return strip_control_characters(piece)

    def _scrub(self, text: str) -> str:
        """Remove special-token text; repeated, since a removal can join a new occurrence."""
        changed = True
        while changed:
            changed = False
            for special in self._special:
                if special in text:
                    text = text.replace(special, "")
                    changed = True
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def strip_control_characters(text: str) -> str:
    """`text` without control characters other than newline and tab."""
    return CONTROL_CHARS.sub("", text)


def _first_stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, if any."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_tail_length(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `patterns`."""
    longest = 0
    for pattern in patterns:
        if pattern[0] not in text[-len(pattern) :]:
            continue  # the cheap common case: this pattern cannot start in the tail
        for size in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:size]):
                longest = size
                break
    return longest
