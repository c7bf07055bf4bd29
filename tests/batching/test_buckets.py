"""The shapes a decode step runs at: batch and KV-length buckets, without a model."""

from __future__ import annotations

import pytest

from batching.generation.static_decode import (
    batch_buckets,
    decode_kv_buckets,
    eager_kv_buckets,
    kv_buckets,
    pad_to_bucket,
)


def test_batch_buckets_are_powers_of_two_to_8_then_multiples_of_8() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize(
    ("num_slots", "expected"),
    [
        (1, [1]),
        (2, [1, 2]),
        (3, [1, 2, 3]),
        (5, [1, 2, 4, 5]),
        (16, [1, 2, 4, 8, 16]),
        (20, [1, 2, 4, 8, 16, 20]),
    ],
)
def test_the_largest_batch_bucket_is_exactly_the_slot_count(
    num_slots: int, expected: list[int]
) -> None:
    assert batch_buckets(num_slots) == expected


def test_batch_sizes_pad_up_to_the_next_bucket() -> None:
    buckets = batch_buckets(32)
    padded = {size: pad_to_bucket(size, buckets) for size in (1, 3, 5, 7, 8, 9, 13, 17, 32)}
    assert padded == {1: 1, 3: 4, 5: 8, 7: 8, 8: 8, 9: 16, 13: 16, 17: 24, 32: 32}


def test_kv_buckets_double_from_128_and_end_at_max_seq_len() -> None:
    assert kv_buckets(512) == [128, 256, 512]
    assert kv_buckets(300) == [128, 256, 300]
    assert kv_buckets(128) == [128]


def test_a_short_context_has_one_kv_bucket_of_its_own_length() -> None:
    assert kv_buckets(96) == [96]


def test_the_smallest_kv_bucket_can_be_chosen() -> None:
    assert kv_buckets(96, smallest=16) == [16, 32, 64, 96]


def test_kv_lengths_pad_up_to_the_next_bucket() -> None:
    buckets = kv_buckets(96, smallest=16)
    assert [pad_to_bucket(n, buckets) for n in (1, 16, 17, 33, 64, 65, 96)] == [
        16,
        16,
        32,
        64,
        64,
        96,
        96,
    ]


def test_eager_kv_buckets_are_every_multiple_of_16_up_to_max_seq_len() -> None:
    assert eager_kv_buckets(100) == [16, 32, 48, 64, 80, 96, 100]
    assert eager_kv_buckets(8) == [8]


def test_a_runner_doubles_kv_buckets_where_graphs_may_be_captured_or_a_smallest_is_chosen() -> None:
    assert decode_kv_buckets(512, graphs=True, smallest=None) == [128, 256, 512]
    assert decode_kv_buckets(96, graphs=False, smallest=16) == [16, 32, 64, 96]
    assert decode_kv_buckets(64, graphs=False, smallest=None) == [16, 32, 48, 64]


@pytest.mark.parametrize("size", [0, 97])
def test_a_size_outside_the_buckets_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_bucket(size, kv_buckets(96, smallest=16))


def test_bucket_lists_need_positive_sizes() -> None:
    with pytest.raises(ValueError):
        batch_buckets(0)
    with pytest.raises(ValueError):
        kv_buckets(96, smallest=0)
