"""The static decode step: the shapes it runs at, the buffers it reads and writes, its CUDA graphs.

A CUDA graph replays one fixed shape at fixed addresses, so a decode step that may be captured
is built from three parts, in this order below:

1. Buckets. The decode step cannot run at every (batch, KV length) pair a server meets: rows
   join and leave every step and sequences grow by one token per step. Padding both up to a
   short list of sizes lets one captured graph serve many steps:

   * batch buckets 1, 2, 4, 8, then every multiple of 8, and always exactly `num_slots` last
     (the most rows that can ever be active): padding wastes at most 7 rows past 8, and small
     batches, where latency matters most, are padded the least;
   * KV buckets double from `smallest` (128, or max_seq_len if that is shorter) and end at
     exactly max_seq_len: attention never reads more than twice the longest active row (or
     `smallest`), and each KV bucket is one more graph per batch bucket, so there are few.
     Where no graph is captured (CPU, or graphs off) more buckets cost nothing, so they are
     every multiple of 16 there and attention reads at most 15 padded columns (on a 2-core
     CPU, doubling from 128 made a batch-32 step ~20% slower, doubling from 16 ~2.5%).

   Plain Python on purpose: tested without a model, and the same on CPU and GPU.

2. DecodeBuffers: everything a decode step consumes or produces, allocated once for the largest
   batch bucket (`max_rows` = GENERATE_SLOTS) and rewritten in place every step:

   * one host array [max_rows, 2 + max_blocks] int64 holding, per row, the input token, its
     position (where its K/V goes, = the row's current length) and its block table (unused
     entries: the spare block); pinned on CUDA, so each step is ONE non-blocking host-to-device
     copy into `_device`, whose columns are the views `tokens`, `positions` and `tables` the
     forward pass reads;
   * `logits` [max_rows, V] float32, which the step writes and the sampler reads.

   Rows past the real batch are padding: token 0 at position 0 of a table of spare blocks, so
   they write only to the spare block and never touch live K/V; position 0 gives each of them
   one attendable column, so softmax never sees an all-masked row (NaN).

   The masks (attention.py) and the pool rows written are computed on the device from
   `positions` and `tables`, so they are part of the captured graph, not host work.

   The host buffer is rewritten at the start of the next step, after the previous copy has
   finished: normally it has long finished (the sampled tokens came back to the host, a sync),
   and an event recorded after each copy makes sure of it even when a step failed half way.

3. DecodeGraphs: one CUDA graph per (batch bucket, KV bucket), captured at warm-up. Why: an
   eager decode step of a small model is launch-bound. A Qwen2.5-0.5B shape launches about 890
   kernels per step, each costing the host several microseconds, so a step took ~30 ms on an
   H100 for 2.9 ms of GPU work. A graph replays all of them with one launch.

   How (the shape of nano-vllm's capture_cudagraph): the step reads and writes only static
   buffers (DecodeBuffers, the KV cache), so a replay needs nothing but new values in them.
   All graphs share one memory pool, captured largest first, so the smaller ones reuse the
   memory the largest already holds; they never run at the same time, so sharing is safe.

   Captured at warm-up rather than on first use: a capture costs far more than a step, and a
   server should not pay that in the middle of serving someone's stream.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

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


TOKEN, POSITION, TABLE = 0, 1, 2  # the columns of the host and device buffers: TABLE..


class DecodeBuffers:
    """Static decode inputs (tokens, positions, block tables) and the logits they produce."""

    def __init__(
        self,
        *,
        max_rows: int,
        max_seq_len: int,
        max_blocks: int,
        vocab_size: int,
        spare_block: int,
        device: torch.device,
    ) -> None:
        self.max_rows = max_rows
        self._spare_block = spare_block
        self._max_blocks = max_blocks
        pinned = device.type == "cuda"  # pinned memory needs CUDA; on CPU there is no copy cost
        shape = (max_rows, TABLE + max_blocks)
        self._host = torch.zeros(shape, dtype=torch.int64, pin_memory=pinned)  # [R, 2 + M]
        # numpy writes Python ints straight into the (pinned) memory: no tensor per step.
        self._host_rows = self._host.numpy()
        self._copied = torch.cuda.Event() if pinned else None  # the last copy has finished
        self._device = torch.zeros(shape, dtype=torch.int64, device=device)  # [R, 2 + M]
        self.tokens = self._device[:, TOKEN]  # [R]
        self.positions = self._device[:, POSITION]  # [R]
        self.tables = self._device[:, TABLE:]  # [R, M]
        self.logits = torch.zeros((max_rows, vocab_size), dtype=torch.float32, device=device)
        self.load([], [], [])

    def load(
        self,
        tokens: Sequence[int],
        lengths: Sequence[int],
        tables: Sequence[Sequence[int]],
        padded: Sequence[int] = (),
    ) -> None:
        """Rows 0..B-1 get the real tokens (row r holds lengths[r] tokens already, in the
        blocks tables[r]); the rest, and the rows in `padded` (a row still prefilling its
        prompt), are padding: they attend only to column 0 and write to the spare block.
        One host-to-device copy."""
        rows = len(tokens)
        if rows > self.max_rows or len(lengths) != rows or len(tables) != rows:
            raise ValueError(f"{rows} rows, {len(lengths)} lengths for {self.max_rows} rows")
        host = self._wait_for_last_copy()
        host[:rows, TOKEN] = tokens
        host[:rows, POSITION] = lengths
        for row, table in enumerate(tables):
            host[row, TABLE : TABLE + len(table)] = table
            host[row, TABLE + len(table) :] = self._spare_block
        host[rows:] = 0
        host[rows:, TABLE:] = self._spare_block
        for row in padded:
            host[row] = 0
            host[row, TABLE:] = self._spare_block
        self._copy_to_device()

    def load_probe(self, rows: int, kv_len: int, num_blocks: int) -> None:
        """Varied rows for checking a captured graph against the eager step: row r reads token
        (31r + 1) mod V at position (7r + 3) mod kv_len, in blocks 1.. of a pool of
        `num_blocks` (rows may share blocks: the probe compares two identical runs)."""
        host = self._wait_for_last_copy()
        every = np.arange(self.max_rows)
        host[:, TOKEN] = (every * 31 + 1) % self.logits.shape[1]
        host[:, POSITION] = (every * 7 + 3) % kv_len
        columns = np.arange(self._max_blocks)
        host[:, TABLE:] = (every[:, None] * self._max_blocks + columns[None, :]) % num_blocks + 1
        host[rows:] = 0
        host[rows:, TABLE:] = self._spare_block
        self._copy_to_device()

    def _wait_for_last_copy(self) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_rows

    def _copy_to_device(self) -> None:
        self._device.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self._device.device))


logger = logging.getLogger(__name__)
CudaGraphsMode = Literal["auto", "on", "off"]  # auto = on where CUDA is available
DecodeShape = tuple[int, int]  # (batch bucket, KV bucket)
WARMUP_RUNS = 2  # eager runs per shape on a side stream before capture, as PyTorch asks


@dataclass(frozen=True)
class CudaGraphsReport:
    """Whether the decode step replays CUDA graphs, why (not), and which shapes were captured."""

    enabled: bool
    reason: str
    batch_buckets: tuple[int, ...] = ()
    kv_buckets: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "reason": self.reason,
            "batch_buckets": list(self.batch_buckets),
            "kv_buckets": list(self.kv_buckets),
        }

    def log(self, *, requested: bool) -> None:
        """The start-up log line; a warning when graphs were asked for and are not used."""
        if self.enabled:
            logger.info(
                "CUDA graphs on: %s (batch buckets %s x KV buckets %s)",
                self.reason,
                list(self.batch_buckets),
                list(self.kv_buckets),
            )
        else:
            logger.log(
                logging.WARNING if requested else logging.INFO,
                "CUDA graphs unavailable, the decode step runs eagerly: %s",
                self.reason,
            )


def unavailable_reason(mode: CudaGraphsMode, device: torch.device) -> str | None:
    """Why graphs cannot be used with this mode on this device; None if they can be tried."""
    if mode == "off":
        return "turned off (cuda_graphs='off')"
    if device.type != "cuda":
        return f"no CUDA device: the model runs on {device.type}"
    return None


class DecodeGraphs:
    """Captured graphs of `run_step(batch, kv_len)`, keyed by shape; replay() runs one."""

    def __init__(self) -> None:
        self._graphs: dict[DecodeShape, torch.cuda.CUDAGraph] = {}

    def capture(self, run_step: Callable[[int, int], None], shapes: Sequence[DecodeShape]) -> None:
        """Warm up, then capture every shape; raises whatever the capture raises."""
        largest_first = sorted(shapes, reverse=True)
        # PyTorch's docs: run a few eager iterations on a side stream before capturing, so
        # lazy initialisation (cuBLAS handles, workspaces, autotuning) is not captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for batch, kv_len in largest_first:
                for _ in range(WARMUP_RUNS):
                    run_step(batch, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for batch, kv_len in largest_first:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (the /predict collector) meanwhile is
            # not an error; only this thread's unsafe calls (a host sync) fail the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                run_step(batch, kv_len)
            self._graphs[(batch, kv_len)] = graph
        torch.cuda.synchronize()

    def replay(self, shape: DecodeShape) -> bool:
        """Replay the graph of `shape`; False (nothing run) if there is none."""
        graph = self._graphs.get(shape)
        if graph is None:
            return False
        graph.replay()
        return True

    def clear(self) -> None:
        """Drop every graph (their memory goes back to the pool's allocator)."""
        self._graphs.clear()
