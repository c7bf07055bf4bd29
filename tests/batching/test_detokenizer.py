"""Incremental detokenization with a real byte-level BPE: whole characters, stop strings."""

from __future__ import annotations

import unicodedata

import torch
from transformers import PreTrainedTokenizerFast

from batching.generation.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

MULTIBYTE = "héllo wörld ✓ 日本語 😀 café"


def stream(
    tokenizer: PreTrainedTokenizerFast, ids: list[int], stop: tuple[str, ...] = ()
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop=stop)
    pieces = []
    for token_id in ids:
        pieces.append(detok.add(token_id))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces, detok


def byte_tokens(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    alphabet = {b: tokenizer.convert_tokens_to_ids(c) for b, c in _byte_level_alphabet().items()}
    return [alphabet[b] for b in text.encode()]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer uses it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    printable += list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def test_multibyte_characters_are_never_split(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = byte_tokens(tokenizer, MULTIBYTE)
    pieces, detok = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE == detok.text
    assert "" in pieces[:-1]  # something was held back: the test did split characters


def test_trained_tokens_round_trip_piece_by_piece(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(MULTIBYTE)
    pieces, _ = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE


def test_any_token_sequence_gives_exactly_the_full_decode_without_control_characters(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(3, len(tokenizer), (40,), generator=generator).tolist()
        pieces, _ = stream(tokenizer, ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        visible = "".join(c for c in full if c in "\n\t" or unicodedata.category(c) != "Cc")
        assert "".join(pieces) == visible


def test_control_characters_other_than_newline_and_tab_never_come_out(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "a\x1b[31mred\x1b[0m\r\nnul\x00 del\x7f c1\x85 tab\tnl\n"
    pieces, detok = stream(tokenizer, byte_tokens(tokenizer, text))
    assert "".join(pieces) == detok.text == "a[31mred[0m\nnul del c1 tab\tnl\n"


def test_special_token_text_is_removed_even_when_spelled_out_byte_by_byte(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "before</s>mid<s>after <s partial <|x|>"
    ids = [*byte_tokens(tokenizer, text), tokenizer.convert_tokens_to_ids("</s>")]
    detok = IncrementalDetokenizer(tokenizer, [], special_tokens=("<s>", "</s>", "<|x|>"))
    pieces = [detok.add(token_id) for token_id in ids] + [detok.finish()]
    assert "".join(pieces) == detok.text == "beforemidafter <s partial "
    streamed = ["".join(pieces[: i + 1]) for i in range(len(pieces))]  # what a client has seen
    assert not any(special in seen for seen in streamed for special in ("<s>", "</s>", "<|x|>"))


def test_a_stop_string_spanning_tokens_ends_the_text_before_it(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "stop here. END of the line."
    ids = byte_tokens(tokenizer, text)  # "END" is three tokens here
    pieces, detok = stream(tokenizer, ids, stop=("END",))
    assert detok.stopped
    assert "".join(pieces) == "stop here. " == detok.text
    assert all("E" not in piece for piece in pieces)  # not even part of it leaked


def test_a_stop_string_inside_one_trained_token_is_found(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    pieces, detok = stream(tokenizer, tokenizer.encode(text), stop=("ick bro",))
    assert detok.stopped
    assert "".join(pieces) == "The qu"


def test_a_multibyte_stop_string_is_matched_on_whole_characters(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    pieces, detok = stream(tokenizer, byte_tokens(tokenizer, MULTIBYTE), stop=("日本",))
    assert detok.stopped
    assert "".join(pieces) == "héllo wörld ✓ "


def test_the_earliest_of_several_stop_strings_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "numbers 0 1 2 3 42 3.14"
    _, detok = stream(tokenizer, tokenizer.encode(text), stop=("42", "1 2"))
    assert detok.text == "numbers 0 "


def test_a_held_back_partial_match_is_released_when_it_stops_matching(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    text = "stop here. END of the line."
    pieces, detok = stream(tokenizer, byte_tokens(tokenizer, text), stop=("ENDING",))
    assert not detok.stopped
    assert "".join(pieces) == text
    assert pieces[-1] == ""  # "END" was released as soon as " " ruled "ENDING" out


def test_finish_releases_a_trailing_partial_match(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "stop here. EN"
    pieces, detok = stream(tokenizer, byte_tokens(tokenizer, text), stop=("END",))
    assert not detok.stopped
    assert pieces[-1] == "EN"
    assert detok.text == text


def test_prompt_context_does_not_leak_into_the_output(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("The quick brown")
    output = tokenizer.encode(" fox jumps")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    text = "".join(detok.add(t) for t in output) + detok.finish()
    assert text == " fox jumps"
