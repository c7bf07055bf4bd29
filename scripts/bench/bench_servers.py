"""Start and stop the benchmarked servers, one process each, on free loopback ports, and
measure one of them at a time while the others are paused (`Systems`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_load as load
import bench_metrics as metrics
from harness import HttpServer, free_port

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 180.0
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: its command, extra environment and readiness path."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    port: int
    cwd: Path = REPO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def ours(
    predict_model: str,
    generate_model: str,
    max_batch: int,
    max_wait_ms: float,
    slots: int,
    max_seq_len: int,
    max_new_tokens: int,
    checkout: Path = REPO,
    name: str = "",
    extra_env: dict[str, str] | None = None,
) -> ServerSpec:
    """`python -m service` run from `checkout` (another checkout: before/after comparisons)."""
    port = free_port()
    env = {
        "PREDICT_MODEL": predict_model,
        "GENERATE_MODEL": generate_model,
        "PREDICT_MAX_BATCH_SIZE": str(max_batch),
        "PREDICT_MAX_WAIT_MS": str(max_wait_ms),
        "PREDICT_MAX_QUEUE": "4096",
        "GENERATE_SLOTS": str(slots),
        "GENERATE_MAX_SEQ_LEN": str(max_seq_len),
        "GENERATE_MAX_NEW_TOKENS": str(max_new_tokens),
        "GENERATE_MAX_QUEUE": "4096",
        "REQUEST_TIMEOUT_S": "300",
        "RATE_LIMIT": "100000000/minute",
        "LOG_LEVEL": "WARNING",
        "HOST": "127.0.0.1",
        "PORT": str(port),
    } | (extra_env or {})
    name = name or ("ours" if predict_model else "ours-generate")
    return ServerSpec(name, [sys.executable, "-m", "service"], env, "/ready", port, checkout)


def peer(
    kind: str,
    predict_model: str = "",
    generate_model: str = "",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
) -> ServerSpec:
    """floor, naive or litserve (see bench_peers.py)."""
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "bench_peers.py"), kind, "--port", str(port)]
    command += ["--predict-model", predict_model, "--generate-model", generate_model]
    command += ["--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    return ServerSpec(kind, command, {}, "/health", port)


def transformers_serve(generate_model: str) -> ServerSpec:
    """`transformers serve --continuous-batching` preloading the local model folder."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", generate_model]
    command += ["--continuous-batching", "--device", "cpu", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "error"]
    return ServerSpec("transformers-serve", command, {"HF_HUB_OFFLINE": "1"}, "/health", port)


def start_server(spec: ServerSpec, log_dir: Path) -> HttpServer:
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | spec.env
    return HttpServer(
        spec.name,
        spec.command,
        log_dir / f"{spec.name}.log",
        port=spec.port,
        ready_path=spec.ready_path,
        env=env,
        cwd=spec.cwd,
    )


def idle_cpu_percent(server: HttpServer, seconds: float = 2.0) -> float:
    """CPU used by the process group while nobody calls it, in % of one core."""
    before = group_cpu_ticks(server.proc.pid)
    time.sleep(seconds)
    used = group_cpu_ticks(server.proc.pid) - before
    return round(100.0 * used / CLOCK_TICKS_PER_S / seconds, 1)


class Systems:
    """The servers, all started at once; each is paused (SIGSTOP) except while measured.

    The machine may be shared: a run during which processes outside the benchmark used more
    than `max_background_cpu` cores (on average) is measured again, up to `retries` times; the
    share is recorded with each run (`background_cpu`).
    """

    def __init__(
        self,
        specs: dict[str, ServerSpec],
        log_dir: Path,
        max_background_cpu: float = 0.25,
        retries: int = 3,
    ) -> None:
        self.specs = specs
        self.procs = {name: start_server(spec, log_dir) for name, spec in specs.items()}
        self.idle_cpu_percent: dict[str, float] = {}
        self.max_background_cpu = max_background_cpu
        self.retries = retries
        self._own_groups = {os.getpgid(0), *(proc.proc.pid for proc in self.procs.values())}

    def start_alone(self, name: str, spec: ServerSpec, log_dir: Path, timeout_s: float) -> None:
        """Start one more server once the others are paused, and pause it once ready: its
        warm-up runs alone (GENERATE_PREFILL_CHUNK_TOKENS=auto measures the machine there)."""
        self.specs = {**self.specs, name: spec}
        self.procs[name] = proc = start_server(spec, log_dir)
        self._own_groups.add(proc.proc.pid)
        proc.wait_ready(timeout_s)
        proc.pause()

    def wait_ready(self) -> None:
        for name, proc in self.procs.items():
            proc.wait_ready(READY_TIMEOUT_S)
            self.idle_cpu_percent[name] = idle_cpu_percent(proc, 1.0)
            proc.pause()

    def close(self) -> None:
        for proc in self.procs.values():  # all at once: some take seconds to shut down
            proc.interrupt()
        for proc in self.procs.values():
            proc.stop(timeout_s=5.0)

    async def measure(
        self,
        name: str,
        call: load.Call,
        warm_call: load.Call,
        items: Sequence[Any] | Callable[[int], Sequence[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`measure_once`, again while other processes took more than their share of the CPU.

        `items` may be a function of the attempt (0, 1, ...): a run against a cache must not
        see the texts of a discarded attempt again.
        """
        for attempt in range(self.retries + 1):
            these = items(attempt) if callable(items) else items
            await asyncio.to_thread(wait_for_quiet, self._own_groups, self.max_background_cpu)
            before_ticks, before_s = background_cpu_ticks(self._own_groups), time.monotonic()
            run = await self.measure_once(name, call, warm_call, these, *args, **kwargs)
            used_s = (background_cpu_ticks(self._own_groups) - before_ticks) / CLOCK_TICKS_PER_S
            run["background_cpu"] = round(used_s / max(time.monotonic() - before_s, 1e-3), 2)
            run["attempts"] = attempt + 1
            if run["background_cpu"] <= self.max_background_cpu:
                break
            print(f"{name}: other processes used {run['background_cpu']} cores, measuring again")
        return run

    async def measure_once(
        self,
        name: str,
        call: load.Call,
        warm_call: load.Call,
        items: Sequence[Any],
        concurrency: int | None = None,
        rate: float | None = None,
        desc: str = "",
        histogram: str = "predict_batch_size",
        warm_items: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """One run (closed loop at `concurrency`, or open loop at `rate`), after a short
        warm-up (on `warm_items`, by default the first 16 items), with the server's mean batch
        size and response-cache hit ratio from its /metrics."""
        proc, url = self.procs[name], self.specs[name].url
        warm = list(warm_items if warm_items is not None else items[:16])
        proc.resume()
        try:
            await load.run_closed(warm_call, warm, min(16, len(warm)))
            before, tcp_before = await metrics.scrape_metrics(url), metrics.tcp_counters()
            if rate is None:
                samples, wall_s = await load.run_closed(
                    call, items, concurrency or 1, desc, connect_url=f"{url}/health"
                )
            else:
                samples, wall_s = await load.run_open(call, items, rate, desc)
            after, tcp_after = await metrics.scrape_metrics(url), metrics.tcp_counters()
        finally:
            proc.pause()
        tcp = {k: v - tcp_before.get(k, 0) for k, v in tcp_after.items()}
        mean_batch = metrics.histogram_mean(before, after, histogram)
        hit_ratio = metrics.hit_ratio(before, after, "predict_cache")
        summary = load.summarize(samples, wall_s) | {"mean_batch": mean_batch, "tcp": tcp}
        return summary | ({"cache_hit_ratio": hit_ratio} if hit_ratio is not None else {})


def group_cpu_ticks(pgid: int) -> int:
    """utime + stime of every live process in process group `pgid` (from /proc)."""
    # fields[0] is the state; 2 = pgrp, 11/12 = utime/stime
    return sum(int(f[11]) + int(f[12]) for f in _proc_stats() if int(f[2]) == pgid)


def background_cpu_ticks(own_groups: set[int]) -> int:
    """utime + stime of every user process outside the benchmark's process groups."""
    ticks = 0
    for fields in _proc_stats():
        group = int(fields[2])
        if group != 0 and group not in own_groups:  # group 0: kernel threads
            ticks += int(fields[11]) + int(fields[12])
    return ticks


def wait_for_quiet(
    own_groups: set[int], max_background_cpu: float, timeout_s: float = 180.0, probe_s: float = 2.0
) -> float:
    """Wait (at most `timeout_s`) until other processes use at most `max_background_cpu` cores
    over `probe_s`; returns the seconds waited. A shared box's neighbours come and go."""
    started_s = time.monotonic()
    while time.monotonic() - started_s < timeout_s:
        before = background_cpu_ticks(own_groups)
        time.sleep(probe_s)
        used = (background_cpu_ticks(own_groups) - before) / CLOCK_TICKS_PER_S / probe_s
        if used <= max_background_cpu:
            break
    return time.monotonic() - started_s


def _proc_stats() -> Iterator[list[str]]:
    """The fields after the command name of /proc/<pid>/stat, for every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path | None = None) -> Iterator[HttpServer]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    server = start_server(spec, log_dir)
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop(timeout_s=5.0)
