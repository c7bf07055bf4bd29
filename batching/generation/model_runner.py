"""The forward passes of the engine, gpt-fast style: `prefill`, `decode_step`, and
`mixed_step`, which runs both at once in one forward (see attention.py).

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
  window, chunked) gets one such mask per layer type, as a dict (attention.py).

Prefill shapes change with every admission (rows, prompt lengths). On CUDA, PyTorch's cuDNN
attention backend builds a plan per new shape (measured on an H100, torch 2.11: about 60 ms
extra per new decode shape, 135 ms vs 17 ms per new prefill shape), so a server should turn it
off once at start-up: `torch.backends.cuda.enable_cudnn_sdp(False)` (flash and mem-efficient
attention have no such cost).

The decode step runs at a few bucketed shapes over static buffers (static_decode.py): the
same code on every device, replayed from CUDA graphs where they were captured at warm-up, run
eagerly otherwise. Prefill and mixed steps stay eager. Its attention reads the KV blocks either
through the gather (every device) or in place (FlexAttention), as `choose_paged_attention`
decides at warm-up (GENERATE_PAGED_ATTENTION; attention.py).
"""

from __future__ import annotations

import time
from collections.abc import Collection

import torch

from batching.generation.attention import (
    GATHER,
    IN_PLACE,
    InPlaceAttention,
    LayerMasks,
    Masks,
    MixedLayout,
    PagedAttentionMode,
    PagedAttentionReport,
    PagedLayout,
    PagedPath,
    PrefillSegment,
    install,
)
from batching.generation.kv_cache import PagedKVCache, kv_shape, pool_rows
from batching.generation.model_support import (
    check_supported,
    mixed_steps_unavailable,
    model_name,
)
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

# The in-place check at warm-up: largest |difference| from the gather's logits, relative to the
# largest |logit| (as model_support.py's warm-up checks). fp32 kernels differ in summation
# order only; half precision rounds per kernel. A wrong block mapping or mask over random K/V
# moves far more.
PAGED_FP32_TOLERANCE = 1e-3
PAGED_TOLERANCE = 5e-2
PAGED_PROBE_TOKENS = 64  # at least; past twice a sliding window or chunk, up to 512
# A CPU decode step is split in two by length when that gathers at most this share of the K/V
# positions the one step would (every row is gathered up to the longest row's length).
SPLIT_DECODE_SHARE = 0.5


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
        paged_attention: PagedAttentionMode = "auto",
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
        shape = kv_shape(model)
        self._in_place = InPlaceAttention(
            pattern,
            num_blocks=cache.num_blocks + 1,
            block_size=cache.block_size,
            spare_block=cache.spare_block,
            query_groups=_query_heads(model) // shape.kv_heads,
            device=self.device,
        )
        self._gather_kv_buckets = self.kv_buckets
        self._paged_mode: PagedAttentionMode = paged_attention
        self._in_place_unavailable = (
            None
            if mixed_steps_unavailable(model) is None  # the same need: attention we can replace
            else f"{model_name(model)}'s attention does not go through transformers' "
            "AttentionInterface, where the in-place path replaces it"
        )
        if paged_attention == IN_PLACE and self._in_place_unavailable is None:
            # Asked for: used from the start (warm-up checks it against the gather again).
            self._use_paged(IN_PLACE, "GENERATE_PAGED_ATTENTION=in_place; warm-up checks it")
        else:
            self.gather_until_chosen()

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
        logits = self._forward(input_ids, positions, mask, view, logits_to_keep=keep)
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
        groups = self._length_groups(lengths, riders)
        if groups is not None:
            return self._decode_in_groups(tokens, lengths, tables, riders, groups)
        counted = [n for row, n in enumerate(lengths) if row not in riders] or [0]
        shape = (
            pad_to_bucket(len(tokens), self.batch_buckets),
            pad_to_bucket(max(counted) + 1, self.kv_buckets),  # +1: this step's token
        )
        self.decode_buffers.load(tokens, lengths, tables, sorted(riders))
        if not self._graphs.replay(shape):
            self._decode_bucket(*shape)
        return self.decode_buffers.logits[: len(tokens)]

    def _length_groups(
        self, lengths: list[int], riders: Collection[int]
    ) -> tuple[list[int], list[int]] | None:
        """(shorter rows, longer rows) when decoding them apart gathers at most
        SPLIT_DECODE_SHARE of the K/V positions one step would; else None. CPU gather path
        only: one long row among short ones (a long prompt that just finished its prefill)
        would otherwise make every stream's step copy and attend over its length. On CUDA the
        step replays graphs per bucket, and the in-place path reads each row's own length."""
        if self.device.type != "cpu" or self.paged_attention.path == IN_PLACE or len(lengths) < 2:
            return None
        counted = [0 if row in riders else n for row, n in enumerate(lengths)]
        order = sorted(range(len(lengths)), key=counted.__getitem__)

        def kv(row: int) -> int:
            return pad_to_bucket(counted[row] + 1, self.kv_buckets)

        longest = kv(order[-1])
        split, cost = min(
            ((k, k * kv(order[k - 1]) + (len(order) - k) * longest) for k in range(1, len(order))),
            key=lambda option: option[1],
        )
        if cost > SPLIT_DECODE_SHARE * len(order) * longest:
            return None
        return sorted(order[:split]), sorted(order[split:])

    def _decode_in_groups(
        self,
        tokens: list[int],
        lengths: list[int],
        tables: list[list[int]],
        riders: Collection[int],
        groups: tuple[list[int], ...],
    ) -> torch.Tensor:
        """decode_step for each group of rows apart; logits [B, V] in row order."""
        logits = self.decode_buffers.logits.new_empty(
            (len(tokens), self.decode_buffers.logits.shape[1])
        )
        for rows in groups:
            logits[rows] = self.decode_step(
                [tokens[r] for r in rows],
                [lengths[r] for r in rows],
                [tables[r] for r in rows],
                [i for i, r in enumerate(rows) if r in riders],
            )
        return logits

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
        """The decode step at one bucket, over static buffers only: what a graph captures.
        In place, attention reads each row's own blocks up to its own length (kv_len unused)."""
        buffers = self.decode_buffers
        positions = buffers.positions[:rows]  # [Bb]
        tables = buffers.tables[:rows]  # [Bb, M]
        write_rows = pool_rows(tables, positions[:, None], self.cache.block_size)[:, 0]  # [Bb]
        input_ids = buffers.tokens[:rows, None]  # [Bb, 1]
        if self.paged_attention.path == IN_PLACE:
            layout = self._in_place.layout(positions[:, None], tables)
            view = self.cache.view(write_rows, None)  # the pool, ungathered
            logits = self._forward(input_ids, positions[:, None], self._no_mask, view, layout)
        else:
            mask = self.masks.build(positions[:, None], kv_len)  # [Bb, 1, 1, kv] per layer kind
            view = self.cache.view(write_rows, tables, kv_len)
            logits = self._forward(input_ids, positions[:, None], mask, view)  # [Bb, 1, V]
        buffers.logits[:rows].copy_(logits[:, -1])

    def choose_paged_attention(self) -> PagedAttentionReport:
        """Choose how the decode step's attention reads the KV blocks (GENERATE_PAGED_ATTENTION):
        `in_place` where asked for (or, with `auto`, on CUDA) once its logits match the gather's
        on probe rows; otherwise the gather, with the reason logged and in /info. Call at
        warm-up, before capture_cuda_graphs and before serving: the probe writes scratch blocks.
        """
        mode = self._paged_mode
        if mode == GATHER:
            self._use_paged(GATHER, "GENERATE_PAGED_ATTENTION=gather")
        elif self._in_place_unavailable is not None:
            self._use_paged(GATHER, f"in place is unavailable: {self._in_place_unavailable}")
        elif mode == "auto" and self.device.type != "cuda":
            self._use_paged(
                GATHER,
                f"auto on {self.device.type}: FlexAttention has no fused kernel there (it "
                "computes scores over the whole block pool), so the gather is faster",
            )
        else:
            failure = self._in_place_mismatch()
            if failure is None:
                self._use_paged(
                    IN_PLACE, "its decode logits matched the gather's on probe rows at warm-up"
                )
            else:
                self._use_paged(GATHER, f"in place was checked and not used: {failure}")
        self.paged_attention.log()
        return self.paged_attention

    def gather_until_chosen(self) -> None:
        """Read KV blocks by the gather (the reference) until choose_paged_attention() runs:
        warm-up judges the engine's paths against the model's own forward on it."""
        self._use_paged(GATHER, "not chosen yet (warm-up does it)")

    def _use_paged(self, path: PagedPath, reason: str) -> None:
        self.paged_attention = PagedAttentionReport(self._paged_mode, path, reason)
        # In place, attention reads each row's own length: one KV bucket is enough (and
        # captures one graph per batch bucket instead of one per KV bucket too).
        if path == IN_PLACE:
            self.kv_buckets = [self.cache.max_seq_len]
        else:
            self.kv_buckets = self._gather_kv_buckets

    def _in_place_mismatch(self) -> str | None:
        """Run probe decode rows (random K/V in their blocks, varied lengths, crossing windows)
        on both paths at the smallest and the largest batch bucket; describe the first
        difference, or the failure, if any."""
        tolerance = PAGED_FP32_TOLERANCE if self.dtype == torch.float32 else PAGED_TOLERANCE
        pattern = self.masks.pattern
        sizes = [size for size in (pattern.sliding_window, pattern.chunk_size) if size]
        wanted = max([PAGED_PROBE_TOKENS, *(2 * size + 8 for size in sizes)])
        length = min(self.cache.max_seq_len, wanted, 512)
        per_row = -(-length // self.cache.block_size)
        most = max(1, min(self.max_rows, self.cache.num_blocks // per_row))
        vocab = self.decode_buffers.logits.shape[1]
        try:
            for rows in dict.fromkeys((1, most)):
                tables = self.scratch_tables(rows, length)  # blocks of their own
                self._randomize_blocks(tables)
                lengths = [length - 1 - (5 * r) % max(1, length // 2) for r in range(rows)]
                tokens = [(31 * r + 1) % vocab for r in range(rows)]
                logits = {}
                paths: tuple[PagedPath, ...] = (GATHER, IN_PLACE)
                for path in paths:
                    self._use_paged(path, "checking at warm-up")
                    self.decode_buffers.load(tokens, lengths, tables)
                    self._decode_bucket(pad_to_bucket(rows, self.batch_buckets), length)
                    logits[path] = self.decode_buffers.logits[:rows].clone()  # [rows, V]
                want, got = logits[GATHER], logits[IN_PLACE]
                scale = max(1.0, float(want.abs().max()))
                difference = float((got - want).abs().max())
                if not difference <= tolerance * scale:  # NaN fails too
                    return (
                        f"its logits differ from the gather's (max |diff| {difference:.3g}, "
                        f"largest |logit| {scale:.3g}, at batch {rows})"
                    )
        except Exception as exc:  # a kernel that cannot run here must not stop the server
            return f"it failed on this model or device: {exc!r}"
        return None

    def _randomize_blocks(self, tables: list[list[int]]) -> None:
        """Fill the probe rows' blocks with seeded random K/V (in every layer), so a wrong
        mapping of positions to blocks changes the logits."""
        blocks = torch.tensor(sorted({b for t in tables for b in t}), device=self.device)
        storage = self.cache.storage  # [2, layers, num_blocks + 1, block_size, kv_heads, D]
        generator = torch.Generator(device=self.device).manual_seed(0)
        shape = (storage.shape[0], storage.shape[1], len(blocks), *storage.shape[3:])
        noise = torch.randn(shape, generator=generator, device=self.device)
        storage[:, :, blocks] = noise.to(storage.dtype)

    def capture_cuda_graphs(self) -> CudaGraphsReport:
        """Capture every decode bucket where CUDA graphs can be used and check replays against
        the eager step; on any failure, log why and keep decoding eagerly. If the step fails to
        capture while its attention reads in place, the gather is tried: graphs save far more
        (a launch-bound step) than in place does.

        Call at warm-up, before serving: the probe rows write K/V into blocks nobody holds.
        """
        reason = unavailable_reason(self._graphs_mode, self.device)
        if reason is not None:
            report = CudaGraphsReport(False, reason)
        else:
            started_s = time.perf_counter()
            failure = self._capture_and_check()
            chosen = self.paged_attention
            if failure is not None and chosen.path == IN_PLACE:
                self._use_paged(GATHER, f"CUDA graphs failed with in place: {failure}")
                if self._capture_and_check() is None:
                    failure = None
                    self.paged_attention.log()
                else:  # not in place's fault: it stays, and the step runs eagerly
                    self._use_paged(IN_PLACE, chosen.reason)
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
        paged_layout: PagedLayout | None = None,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        # paged_layout reaches every layer's attention (attention.py) only when given
        extra = {} if paged_layout is None else {"paged_layout": paged_layout}
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache_view,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **extra,
        )
        logits: torch.Tensor = output.logits
        return logits


def _query_heads(model: torch.nn.Module) -> int:
    return int(model.config.get_text_config().num_attention_heads)  # type: ignore[union-attr, operator]


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
    No refusal above a sliding window: the runner masks each layer type itself (attention.py),
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
