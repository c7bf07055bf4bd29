"""Start and stop the benchmarked servers, one process each, on free loopback ports, and
measure one of them at a time while the others are paused (`Systems`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_load as load
import bench_metrics as metrics
import httpx

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 5.0
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    }
    name = "ours" if predict_model else "ours-generate"
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
    command = [sys.executable, str(SCRIPTS / "bench_peers.py"), kind, "--port", str(port)]
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


class ServerProcess:
    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self._log = self.log_path.open("wb")
        env = os.environ | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"} | spec.env
        self.proc = subprocess.Popen(
            spec.command,
            cwd=spec.cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: LitServe forks workers
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited early:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.spec.url + self.spec.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"{self.spec.name} not ready in {timeout_s}s:\n{self.log_tail()}")

    def pause(self) -> None:
        """SIGSTOP the whole process group: a paused server takes no CPU from the one measured
        (LitServe's worker polls its queue every millisecond even when idle)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def idle_cpu_percent(self, seconds: float = 2.0) -> float:
        """CPU used by the process group while nobody calls it, in % of one core."""
        before = group_cpu_ticks(self.proc.pid)
        time.sleep(seconds)
        used = group_cpu_ticks(self.proc.pid) - before
        return round(100.0 * used / CLOCK_TICKS_PER_S / seconds, 1)

    def interrupt(self) -> None:
        """SIGCONT + SIGINT the process group: a clean uvicorn shutdown begins."""
        if self.proc.poll() is None:
            self.resume()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        """interrupt(), wait a little, then SIGKILL whatever is left of the process group."""
        if self.proc.poll() is None:
            self.interrupt()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (forked workers) too
        self.proc.wait()
        self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


class Systems:
    """The servers, all started at once; each is paused (SIGSTOP) except while measured."""

    def __init__(self, specs: dict[str, ServerSpec], log_dir: Path) -> None:
        self.specs = specs
        self.procs: dict[str, ServerProcess] = {}
        for name, spec in specs.items():
            self.procs[name] = ServerProcess(spec, log_dir)
        self.idle_cpu_percent: dict[str, float] = {}

    def wait_ready(self) -> None:
        for name, proc in self.procs.items():
            proc.wait_ready()
            self.idle_cpu_percent[name] = proc.idle_cpu_percent(1.0)
            proc.pause()

    def close(self) -> None:
        for proc in self.procs.values():  # all at once: some take seconds to shut down
            proc.interrupt()
        for proc in self.procs.values():
            proc.stop()

    async def measure(
        self,
        name: str,
        call: load.Call,
        warm_call: load.Call,
        items: Sequence[Any],
        concurrency: int | None = None,
        rate: float | None = None,
        desc: str = "",
        histogram: str = "predict_batch_size",
    ) -> dict[str, Any]:
        """One run (closed loop at `concurrency`, or open loop at `rate`), after a short
        warm-up, with the server's mean batch size from its /metrics."""
        proc, url = self.procs[name], self.specs[name].url
        proc.resume()
        try:
            await load.run_closed(warm_call, items[:16], min(16, len(items)))
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
        return load.summarize(samples, wall_s) | {"mean_batch": mean_batch, "tcp": tcp}


def group_cpu_ticks(pgid: int) -> int:
    """utime + stime of every live process in process group `pgid` (from /proc)."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state; 2 = pgrp, 11/12 = utime/stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path | None = None) -> Iterator[ServerProcess]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    server = ServerProcess(spec, log_dir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
