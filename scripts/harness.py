"""One harness for the real processes that tests and benchmarks start: free port, start,
wait until ready, stop.

Each process runs in its own process group with its stdout and stderr in a log file, so a stop
reaches the workers it forked, and a failure can quote the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

POLL_S = 0.05
STOP_TIMEOUT_S = 30.0  # the service drains running requests on SIGINT/SIGTERM first
SERVICE_COMMAND = (sys.executable, "-m", "service")  # exactly what ./scripts/serve runs


class ProcessFailed(RuntimeError):
    """A managed process exited early or did not get ready in time (the message quotes its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


class ManagedProcess:
    """A child process in its own process group, its output in `log_path`."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        # Append mode: a child that opens the same file again (NGINX's access_log /dev/stdout)
        # writes at the end too, instead of over what went through the inherited descriptor.
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=os.environ | dict(env or {}),
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def wait_until(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `check` until it is true; ProcessFailed if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                self._fail(f"exited with {self.proc.returncode} before {what}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if check():
                    return
            time.sleep(POLL_S)
        self._fail(f"not {what} after {timeout_s:g}s")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def pause(self) -> None:
        """SIGSTOP the whole group: a paused process takes no CPU from one being measured."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def interrupt(self) -> None:
        """Begin a clean shutdown (the service drains on SIGINT) without waiting for it."""
        if self.running:
            self.resume()
            self.signal_group(signal.SIGINT)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """interrupt(), wait up to timeout_s, then SIGKILL whatever is left of the group."""
        if self.running:
            self.interrupt()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        self.signal_group(signal.SIGKILL)  # stragglers (forked workers) too
        self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def _fail(self, why: str) -> None:
        raise ProcessFailed(f"{self.name}: {why}\n--- log tail ---\n{self.log_tail()}")


class HttpServer(ManagedProcess):
    """A process serving HTTP on 127.0.0.1:`port`, ready when `ready_path` answers 200."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        port: int,
        ready_path: str = "/ready",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(name, args, log_path, env=env, cwd=cwd)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        self.wait_until(lambda: http_ok(self.url + self.ready_path), timeout_s, "ready")


def start_service(
    log_path: Path,
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    command: Sequence[str] = SERVICE_COMMAND,
    port: int | None = None,
) -> HttpServer:
    """`python -m service` (or `command`, e.g. ./scripts/serve) on `port` (default: a free
    one; a replica restarted behind a proxy needs its old one); not waited for."""
    port = port or free_port()
    full_env = {"HOST": "127.0.0.1", "PORT": str(port), "PYTHONUNBUFFERED": "1"} | dict(env)
    return HttpServer("service", command, log_path, port=port, env=full_env, cwd=cwd)
