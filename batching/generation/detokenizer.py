"""Token ids in, text pieces out: never half a character, never (part of) a stop string.

Two holds keep the stream honest:
* UTF-8: a byte-level token can end in the middle of a multi-byte character; the tokenizer then
  decodes it as U+FFFD. Text that ends in U+FFFD is held until the next token completes it.
* Stop strings: a stop string can span tokens, so the longest tail of the text that is a prefix
  of some stop string is held until it either becomes the stop string (generation ends there;
  the stop string itself is never returned) or stops matching (then it is released).

Decoding uses a short window of ids (the vLLM/TGI "prefix/read offset" trick), so each token costs
O(1) tokenizer work however long the output grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4  # prompt tail decoded with the output, see __init__


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
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
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
        pending = self._held + tail[len(prefix_text) :]
        self._held = ""
        self._read_offset = self._prefix_offset = len(self._ids)
        self.text += pending
        return pending

    def _release(self, piece: str) -> str:
        text = self._held + piece
        if not self._stop:
            self.text += text
            return text
        cut = _first_stop_index(text, self._stop)
        if cut is not None:
            self.stopped = True
            self._held = ""
            self.text += text[:cut]
            return text[:cut]
        keep = _stop_prefix_length(text, self._stop)
        released, self._held = text[: len(text) - keep], text[len(text) - keep :]
        self.text += released
        return released

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def _first_stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, if any."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
