"""The decode step's static inputs and output: allocated once, rewritten in place every step.

A CUDA graph reads and writes fixed addresses, so everything a decode step consumes or produces
lives here, sized for the largest batch bucket (`max_rows` = num_slots):

* one host tensor [3, max_rows] int64 holding, per row, the input token, its position (where
  its K/V goes, = the row's current length) and its write slot; pinned on CUDA, so each step
  is ONE non-blocking host-to-device copy into `_device`, whose three rows are the views
  `tokens`, `positions` and `write_slots` the forward pass reads;
* `logits` [max_rows, V] float32, which the step writes and the sampler reads.

Rows past the real batch are padding: token 0 at position 0, written to the cache's spare slot
(which no sequence owns), so they never touch live K/V; position 0 gives each of them one
attendable column, so softmax never sees an all-masked row (NaN).

The masks are built on the device from `positions` (layer_masks.py), so they are part of the
captured graph instead of host work per step.

The host buffer is rewritten at the start of the next step, after the previous copy has
finished: normally it has long finished (the sampled tokens came back to the host, a sync), and
an event recorded after each copy makes sure of it even when a step failed half way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

TOKEN, POSITION, WRITE_SLOT = 0, 1, 2  # the rows of the host and device buffers


class DecodeBuffers:
    """Static decode inputs (tokens, positions, write slots) and the logits they produce."""

    def __init__(
        self,
        *,
        max_rows: int,
        max_seq_len: int,
        vocab_size: int,
        spare_slot: int,
        device: torch.device,
    ) -> None:
        self.max_rows = max_rows
        self._spare_slot = spare_slot
        pinned = device.type == "cuda"  # pinned memory needs CUDA; on CPU there is no copy cost
        self._host = torch.zeros((3, max_rows), dtype=torch.int64, pin_memory=pinned)  # [3, R]
        # numpy writes Python ints straight into the (pinned) memory: no tensor per step.
        self._host_rows = self._host.numpy()
        self._live_slots = np.arange(max_rows)  # live rows are packed at slots 0..B-1
        self._copied = torch.cuda.Event() if pinned else None  # the last copy has finished
        self._device = torch.zeros((3, max_rows), dtype=torch.int64, device=device)  # [3, R]
        self.tokens = self._device[TOKEN]  # [R]
        self.positions = self._device[POSITION]  # [R]
        self.write_slots = self._device[WRITE_SLOT]  # [R]
        self.logits = torch.zeros((max_rows, vocab_size), dtype=torch.float32, device=device)
        self.load([], [])

    def load(
        self, tokens: Sequence[int], lengths: Sequence[int], padded: Sequence[int] = ()
    ) -> None:
        """Rows 0..B-1 get the real tokens (row r holds lengths[r] tokens already); the rest,
        and the rows in `padded` (a row still prefilling its prompt), are padding: they attend
        only to column 0 and write to the spare slot. One host-to-device copy."""
        rows = len(tokens)
        if rows > self.max_rows or len(lengths) != rows:
            raise ValueError(f"{rows} rows with {len(lengths)} lengths for {self.max_rows} slots")
        host = self._wait_for_last_copy()
        host[TOKEN, :rows] = tokens
        host[POSITION, :rows] = lengths
        host[WRITE_SLOT, :rows] = self._live_slots[:rows]
        host[TOKEN, rows:] = 0
        host[POSITION, rows:] = 0
        host[WRITE_SLOT, rows:] = self._spare_slot
        for row in padded:
            host[:, row] = [0, 0, self._spare_slot]
        self._copy_to_device()

    def load_probe(self, rows: int, kv_len: int) -> None:
        """Varied rows for checking a captured graph against the eager step: row r reads token
        (31r + 1) mod V at position (7r + 3) mod kv_len, written to its own slot r."""
        host = self._wait_for_last_copy()
        host[TOKEN] = (np.arange(self.max_rows) * 31 + 1) % self.logits.shape[1]
        host[POSITION] = (np.arange(self.max_rows) * 7 + 3) % kv_len
        host[WRITE_SLOT] = self._live_slots
        host[:, rows:] = [[0], [0], [self._spare_slot]]
        self._copy_to_device()

    def _wait_for_last_copy(self) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_rows

    def _copy_to_device(self) -> None:
        self._device.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self._device.device))
