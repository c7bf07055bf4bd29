"""The forward passes of the engine, gpt-fast style: `prefill`, `decode_step`, and
`mixed_step`, which runs both at once in one forward (see mixed_attention.py).

Hugging Face decoder-only models of attention layers work (the families model_support.py lists,
bitsandbytes-quantised too; it refuses the rest, and warm-up checks every path against the
model's own forward: model_support.py) because the model is driven through its public forward
with three explicit inputs:

* `past_key_values`: a per-forward view of the paged cache (see kv_cache.py): each row's
  K/V lives in the blocks its block table lists, so rows are just the sequences this forward
  runs, in any order;
* `position_ids` [B, q]: each row's own positions (rows are at different lengths);
* `attention_mask` [B, 1, q, kv]: a 4D *additive float* mask (0 = attend, dtype min = not).
  transformers returns a 4D mask as is, for every attention implementation. A bool mask would
  be silently wrong with eager attention (it adds the mask to the scores), and a 2D mask would
  be expanded against the wrong lengths. A model whose layers attend differently (sliding
  window, chunked) gets one such mask per layer type, as a dict (layer_masks.py).

Prefill shapes change with every admission (rows, prompt lengths). On CUDA, PyTorch's cuDNN
attention backend builds a plan per new shape (measured on an H100, torch 2.11: about 60 ms
extra per new decode shape, 135 ms vs 17 ms per new prefill shape), so a server should turn it
off once at start-up: `torch.backends.cuda.enable_cudnn_sdp(False)` (flash and mem-efficient
attention have no such cost).

The decode step runs at a few bucketed shapes over static buffers (static_decode.py): the
same code on every device, replayed from CUDA graphs where they were captured at warm-up, run
eagerly otherwise. Prefill and mixed steps stay eager.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import torch

from batching.generation.kv_cache import PagedKVCache, kv_shape, pool_rows
from batching.generation.layer_masks import LayerMasks, Masks
from batching.generation.mixed_attention import MixedLayout, PrefillSegment, install
from batching.generation.model_support import check_supported
from batching.generation.static_decode import (
    CudaGraphsMode,
    CudaGraphsReport,
    DecodeBuffers,
    DecodeGraphs,
    DecodeShape,
    batch_buckets,
    decode_kv_buckets,
    pad_to_bucket,
    unavailable_reason,
)


class ModelRunner:
    """Owns the model, the paged cache and the decode buffers; token ids and block tables in,
    logits out. `max_rows` is the most sequences one decode step runs (GENERATE_SLOTS)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        *,
        max_rows: int,
        cuda_graphs: CudaGraphsMode = "auto",
        kv_bucket_min: int | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        pattern = check_supported(model, cache.max_seq_len)  # refuses what it cannot serve
        install(model)  # type: ignore[arg-type]  # the model's own attention unless a step mixes
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        self.device: torch.device = embeddings.weight.device
        self.dtype: torch.dtype = embeddings.weight.dtype  # hidden states, scores, mask
        self.masks = LayerMasks(pattern, cache.max_seq_len, self.dtype, self.device)
        self._arange = torch.arange(cache.max_seq_len, device=self.device)  # [S], reused
        # A mixed forward's attention uses each part's own mask (MixedLayout); the model is
        # given this 4D placeholder only so that it builds no mask of its own.
        self._no_mask = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        reason = unavailable_reason(cuda_graphs, self.device)
        self.max_rows = max_rows
        self.batch_buckets = batch_buckets(max_rows)
        self.kv_buckets = decode_kv_buckets(
            cache.max_seq_len, graphs=reason is None, smallest=kv_bucket_min
        )
        self.decode_buffers = DecodeBuffers(
            max_rows=max_rows,
            max_seq_len=cache.max_seq_len,
            max_blocks=cache.max_blocks_per_seq,
            vocab_size=_output_size(model),
            spare_block=cache.spare_block,
            device=self.device,
        )
        self._graphs_mode: CudaGraphsMode = cuda_graphs
        self._graphs = DecodeGraphs()
        self.cuda_graphs = CudaGraphsReport(False, reason or "not captured yet (warm-up does it)")

    def prefill(
        self,
        tables: list[list[int]],
        chunks: list[list[int]],
        starts: list[int] | None = None,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Write the chunks' K/V to their sequences' blocks and return each row's next-token
        logits.

        Row r continues the sequence whose blocks are tables[r] (enough of them for
        starts[r] + len(chunks[r]) positions), which holds starts[r] tokens already (0 for a
        fresh prompt; more after a prefix-cache hit or earlier chunks of a long prompt): its
        tokens go to positions starts[r].. and attend to everything before them.
        The chunks are left-padded to the longest (q) and run as one batch [k, q], so each
        row's last token is in the last column (`logits_to_keep=1`). Returns float32 logits
        [k, V] for each row's last token, or with `every_position` the model's logits at every
        column, [k, q, V] (for prompt logprobs; keep q small, V can be 150k).
        """
        rows = len(chunks)
        starts = starts if starts is not None else [0] * rows
        seq = max(len(c) for c in chunks)
        kv_len = max(start + len(c) for start, c in zip(starts, chunks, strict=True))
        lengths = torch.tensor([len(c) for c in chunks], device=self.device)  # [k]
        pads = seq - lengths  # [k]
        padded = [[0] * (seq - len(c)) + c for c in chunks]
        input_ids = torch.tensor(padded, device=self.device)  # [k, q]
        columns = self._arange[:seq]  # [q]
        is_real = columns[None, :] >= pads[:, None]  # [k, q]
        first = torch.tensor(starts, device=self.device)[:, None] - pads[:, None]  # [k, 1]
        # Absolute positions; a pad column gets position 0, so it attends to one column of
        # its own row (no all-masked softmax row, which would be NaN).
        positions = (first + columns[None, :]).masked_fill_(~is_real, 0)  # [k, q]
        mask = self.masks.build(positions, kv_len)  # [k, 1, q, kv] per layer kind
        table = self._tables(tables, kv_len)  # [k, blocks]
        # Pad columns write to the spare block's row 0, never to a sequence's blocks.
        write_rows = pool_rows(table, positions, self.cache.block_size).masked_fill_(~is_real, 0)
        view = self.cache.view(write_rows.flatten(), table, kv_len)
        keep = 0 if every_position else 1  # transformers: 0 keeps every position
        logits = self._forward(input_ids, positions, mask, view, keep)  # [k, q or 1, V]
        return logits if every_position else logits[:, -1].float()

    def scratch_tables(self, rows: int, tokens: int) -> list[list[int]]:
        """Block tables for warm-up and measurement rows of `tokens` positions: blocks 1.. in
        turn, wrapping around a small pool (rows may then share blocks; their K/V is garbage
        anyway). Only while nothing is served: they overwrite whatever the blocks hold."""
        count = -(-tokens // self.cache.block_size)
        pool = self.cache.num_blocks
        return [[(row * count + i) % pool + 1 for i in range(count)] for row in range(rows)]

    def _tables(self, tables: list[list[int]], tokens: int) -> torch.Tensor:
        """Block tables [k, blocks covering `tokens`] on the device, padded with the spare."""
        count = -(-tokens // self.cache.block_size)
        spare = self.cache.spare_block
        padded = [[*t[:count], *[spare] * (count - len(t[:count]))] for t in tables]
        return torch.tensor(padded, dtype=torch.int64, device=self.device)

    def decode_step(
        self,
        tokens: list[int],
        lengths: list[int],
        tables: list[list[int]],
        riders: Collection[int] = (),
    ) -> torch.Tensor:
        """Feed one token to each of the rows 0..B-1 (row r holds lengths[r] tokens already,
        in the blocks tables[r], which has room for one more).

        `riders` are rows that only keep the batch packed (a prompt still being prefilled in
        chunks): they run as padding rows, reading and writing nothing of their own, and their
        length does not count, so a long half-prefilled prompt does not make every stream's
        attention read its whole KV length. Their logits are garbage; the caller ignores them.

        Runs at the (batch, KV length) bucket above (B, longest + 1). Returns float32 logits
        [B, V]: a view of the static output buffer, valid until the next decode step.
        """
        counted = [n for row, n in enumerate(lengths) if row not in riders] or [0]
        shape = (
            pad_to_bucket(len(tokens), self.batch_buckets),
            pad_to_bucket(max(counted) + 1, self.kv_buckets),  # +1: this step's token
        )
        self.decode_buffers.load(tokens, lengths, tables, sorted(riders))
        if not self._graphs.replay(shape):
            self._decode_bucket(*shape)
        return self.decode_buffers.logits[: len(tokens)]

    def mixed_step(
        self,
        tokens: list[int],
        lengths: list[int],
        tables: list[list[int]],
        riders: Collection[int],
        first_row: int,
        chunks: list[list[int]],
        starts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_step(tokens, lengths, tables, riders)` and
        `prefill(tables[first_row:first_row + k], chunks, starts)` in one forward: the rows
        being prefilled must be among the riders. Returns float32 logits [B, V] for the decode
        rows (riders' are garbage) and [k, V] for each chunk's last token.

        Exact shapes, no buckets: the chunk sizes vary anyway, so this forward is not captured.
        """
        rows = len(tokens)
        if any(first_row + i not in riders for i in range(len(chunks))):
            raise ValueError("the rows being prefilled must ride in the decode part")
        positions = [0 if r in riders else n for r, n in enumerate(lengths)]
        counted = [n for r, n in enumerate(lengths) if r not in riders] or [0]
        decode_kv_len = max(counted) + 1  # +1: this step's token
        spare = self.cache.spare_block
        decode_tables = [[spare] if r in riders else t for r, t in enumerate(tables)]
        decode_table = self._tables(decode_tables, decode_kv_len)  # [B, blocks]
        decode_positions = torch.tensor(positions, device=self.device)  # [B]
        write_rows = [
            pool_rows(decode_table, decode_positions[:, None], self.cache.block_size)[:, 0]
        ]  # [B]; riders: the spare block
        segments, offset = [], rows
        for row, (start, chunk) in enumerate(zip(starts, chunks, strict=True)):
            kv_len = start + len(chunk)
            table = self._tables([tables[first_row + row]], kv_len)  # [1, blocks]
            chunk_positions = self._arange[start:kv_len]  # [q]
            write_rows.append(pool_rows(table, chunk_positions[None], self.cache.block_size)[0])
            segments.append(
                PrefillSegment(table, offset, len(chunk), kv_len, self._causal(start, len(chunk)))
            )
            positions.extend(range(start, kv_len))
            offset += len(chunk)
        packed_positions = torch.tensor(positions, device=self.device)  # [N]
        decode_mask = self.masks.build(packed_positions[:rows, None], decode_kv_len)
        layout = MixedLayout(
            rows, decode_kv_len, decode_table, decode_mask, tuple(segments)
        )  # decode_mask: [B, 1, 1, kv] per layer kind
        input_ids = torch.tensor([tokens + [t for c in chunks for t in c]], device=self.device)
        keep = torch.tensor(
            [*range(rows), *(s.offset + s.length - 1 for s in segments)], device=self.device
        )  # [B + k]: each decode row, and each chunk's last token
        view = self.cache.view(torch.cat(write_rows), None)
        output = self.model(
            input_ids=input_ids,
            position_ids=packed_positions[None],
            attention_mask=self._no_mask,
            past_key_values=view,
            use_cache=True,
            logits_to_keep=keep,
            mixed_layout=layout,
        )
        logits = output.logits[0].float()  # [B + k, V]
        return logits[:rows], logits[rows:]

    def _causal(self, start: int, length: int) -> Masks:
        """Masks [1, 1, length, start + length] for queries at positions start.. start+length-1."""
        return self.masks.build(self._arange[None, start : start + length], start + length)

    def _decode_bucket(self, rows: int, kv_len: int) -> None:
        """The decode step at one bucket, over static buffers only: what a graph captures."""
        buffers = self.decode_buffers
        positions = buffers.positions[:rows]  # [Bb]
        tables = buffers.tables[:rows]  # [Bb, M]
        mask = self.masks.build(positions[:, None], kv_len)  # [Bb, 1, 1, kv] per layer kind
        write_rows = pool_rows(tables, positions[:, None], self.cache.block_size)[:, 0]  # [Bb]
        view = self.cache.view(write_rows, tables, kv_len)
        input_ids = buffers.tokens[:rows, None]  # [Bb, 1]
        logits = self._forward(input_ids, positions[:, None], mask, view)  # [Bb, 1, V]
        buffers.logits[:rows].copy_(logits[:, -1])

    def capture_cuda_graphs(self) -> CudaGraphsReport:
        """Capture every decode bucket where CUDA graphs can be used and check replays against
        the eager step; on any failure, log why and keep decoding eagerly.

        Call at warm-up, before serving: the probe rows write K/V into blocks nobody holds.
        """
        reason = unavailable_reason(self._graphs_mode, self.device)
        if reason is not None:
            report = CudaGraphsReport(False, reason)
        else:
            started_s = time.perf_counter()
            failure = self._capture_and_check()
            seconds = time.perf_counter() - started_s
            count = len(self.batch_buckets) * len(self.kv_buckets)
            report = CudaGraphsReport(
                failure is None,
                failure or f"{count} decode graphs captured at warm-up in {seconds:.1f}s",
                tuple(self.batch_buckets) if failure is None else (),
                tuple(self.kv_buckets) if failure is None else (),
            )
        self.cuda_graphs = report
        report.log(requested=self._graphs_mode == "on" or reason is None)
        return report

    def _capture_and_check(self) -> str | None:
        """Capture all buckets, then compare the largest and smallest graphs' replays with the
        eager step on probe rows. Returns why graphs cannot be used, or None."""
        shapes = [(b, kv) for b in self.batch_buckets for kv in self.kv_buckets]
        self.decode_buffers.load([], [], [])  # all rows padding: capture writes the spare block
        try:
            self._graphs.capture(self._decode_bucket, shapes)
            failure = self._replay_mismatch([max(shapes), min(shapes)])
        except Exception as exc:  # a graph must never stop the server: eager still works
            failure = f"capture failed: {exc!r}"
        if failure is not None:
            self._graphs.clear()
        return failure

    def _replay_mismatch(self, shapes: list[DecodeShape]) -> str | None:
        """Run probe rows eagerly and by replay; describe the first difference, if any."""
        tolerance = 1e-4 if self.dtype == torch.float32 else 2e-2
        for rows, kv_len in dict.fromkeys(shapes):
            self.decode_buffers.load_probe(rows, kv_len, self.cache.num_blocks)
            self._decode_bucket(rows, kv_len)
            eager = self.decode_buffers.logits[:rows].clone()  # [Bb, V]
            replayed = self.decode_buffers.logits[:rows]  # [Bb, V]; the same buffer, after replay
            if not self._graphs.replay((rows, kv_len)):
                return f"no graph was captured for batch {rows}, KV length {kv_len}"
            if not torch.allclose(replayed, eager, rtol=tolerance, atol=tolerance):
                diff = float((replayed - eager).abs().max())
                return (
                    f"a replay's logits differ from the eager step's (max |diff| {diff:.3g} "
                    f"at batch {rows}, KV length {kv_len})"
                )
        return None

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: Masks,
        cache_view: object,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache_view,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        logits: torch.Tensor = output.logits
        return logits


def _output_size(model: torch.nn.Module) -> int:
    """Logits per row: the output head's size (it can differ from the input vocabulary)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    return int(model.config.get_text_config().vocab_size)  # type: ignore[union-attr, operator]


def build_paged_cache(
    model: torch.nn.Module, num_blocks: int, block_size: int, max_seq_len: int
) -> PagedKVCache:
    """A paged cache shaped for `model` (reads layers, KV heads and head size from its config).
    No refusal above a sliding window: the runner masks each layer type itself (layer_masks.py),
    so the whole context is served."""
    shape = kv_shape(model)
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return PagedKVCache(
        num_layers=shape.layers,
        num_blocks=num_blocks,
        block_size=block_size,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_seq_len=max_seq_len,
        dtype=embeddings.weight.dtype,
        device=embeddings.weight.device,
    )
