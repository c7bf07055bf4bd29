"""The shapes a decode step runs at: batch sizes and attended KV lengths padded up to buckets.

A CUDA graph replays one fixed shape, so the decode step cannot run at every (batch, KV length)
pair a server meets: rows join and leave every step and sequences grow by one token per step.
Padding both up to a short list of sizes lets one captured graph serve many steps:

* batch buckets 1, 2, 4, 8, then every multiple of 8, and always exactly `num_slots` last
  (the most rows that can ever be active): padding wastes at most 7 rows past 8, and small
  batches, where latency matters most, are padded the least;
* KV buckets double from `smallest` (128, or max_seq_len if that is shorter) and end at
  exactly max_seq_len: attention never reads more than twice the longest active row (or
  `smallest`), and each KV bucket is one more graph per batch bucket, so there are few.
  Where no graph is captured (CPU, or graphs off) more buckets cost nothing, so they are
  every multiple of 16 there and attention reads at most 15 padded columns (on a 2-core CPU,
  doubling from 128 made a batch-32 step ~20% slower, doubling from 16 ~2.5%).

Plain Python on purpose: tested without a model, and the same on CPU and GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

GRAPH_KV_BUCKET_MIN = 128  # the smallest KV bucket where CUDA graphs are captured
EAGER_KV_BUCKET_STEP = 16  # where every step runs eagerly: every multiple of this


def batch_buckets(num_slots: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to num_slots; the last bucket is always num_slots."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    sizes = [size for size in (1, 2, 4) if size < num_slots]
    sizes += range(8, num_slots, 8)
    return [*sizes, num_slots]


def kv_buckets(max_seq_len: int, smallest: int = GRAPH_KV_BUCKET_MIN) -> list[int]:
    """smallest, 2 x smallest, 4 x smallest, ... capped at max_seq_len, which is always last."""
    if max_seq_len < 1 or smallest < 1:
        raise ValueError(f"max_seq_len and smallest must be >= 1, got {max_seq_len}, {smallest}")
    sizes: list[int] = []
    size = smallest
    while size < max_seq_len:
        sizes.append(size)
        size *= 2
    return [*sizes, max_seq_len]


def eager_kv_buckets(max_seq_len: int, step: int = EAGER_KV_BUCKET_STEP) -> list[int]:
    """step, 2 x step, 3 x step, ... capped at max_seq_len, which is always last."""
    if max_seq_len < 1 or step < 1:
        raise ValueError(f"max_seq_len and step must be >= 1, got {max_seq_len}, {step}")
    return [*range(step, max_seq_len, step), max_seq_len]


def decode_kv_buckets(max_seq_len: int, *, graphs: bool, smallest: int | None) -> list[int]:
    """The KV buckets a runner uses. A chosen `smallest` gives doubling buckets on every device
    (so a test on a CPU runs the shapes a GPU replays); otherwise doubling from 128 where graphs
    may be captured, and every multiple of 16 where they never are."""
    if smallest is not None:
        return kv_buckets(max_seq_len, smallest)
    return kv_buckets(max_seq_len) if graphs else eager_kv_buckets(max_seq_len)


def pad_to_bucket(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `size` (buckets sorted ascending)."""
    index = bisect.bisect_left(buckets, size)
    if size < 1 or index == len(buckets):
        raise ValueError(f"{size} does not fit the buckets {list(buckets)}")
    return buckets[index]
