"""CUDA graphs of the decode step: one per (batch bucket, KV bucket), captured at warm-up.

Why: an eager decode step of a small model is launch-bound. A Qwen2.5-0.5B shape launches
about 890 kernels per step, each costing the host several microseconds, so a step took ~30 ms
on an H100 for 2.9 ms of GPU work. A graph replays all of them with one launch.

How (the shape of nano-vllm's capture_cudagraph): the step reads and writes only static
buffers (decode_buffers.py, the KV cache), so a replay needs nothing but new values in them.
All graphs share one memory pool, captured largest first, so the smaller ones reuse the memory
the largest already holds; they never run at the same time, so sharing is safe.

Captured at warm-up rather than on first use: a capture costs far more than a step, and a
server should not pay that in the middle of serving someone's stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

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
