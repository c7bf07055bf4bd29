"""The decode step's static inputs and output: allocated once, rewritten in place every step.

A CUDA graph reads and writes fixed addresses, so everything a decode step consumes or produces
lives here, sized for the largest batch bucket (`max_rows` = GENERATE_SLOTS):

* one host array [max_rows, 2 + max_blocks] int64 holding, per row, the input token, its
  position (where its K/V goes, = the row's current length) and its block table (unused
  entries: the spare block); pinned on CUDA, so each step is ONE non-blocking host-to-device
  copy into `_device`, whose columns are the views `tokens`, `positions` and `tables` the
  forward pass reads;
* `logits` [max_rows, V] float32, which the step writes and the sampler reads.

Rows past the real batch are padding: token 0 at position 0 of a table of spare blocks, so
they write only to the spare block and never touch live K/V; position 0 gives each of them
one attendable column, so softmax never sees an all-masked row (NaN).

The masks (layer_masks.py) and the pool rows written are computed on the device from
`positions` and `tables`, so they are part of the captured graph, not host work.

The host buffer is rewritten at the start of the next step, after the previous copy has
finished: normally it has long finished (the sampled tokens came back to the host, a sync), and
an event recorded after each copy makes sure of it even when a step failed half way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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
