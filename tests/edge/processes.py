"""Real processes for the edge tests: spawn, wait, stop; NGINX configs rendered for tests.

Nothing is mocked. The checked-in configs are rendered with only addresses, ports and file
paths substituted (`app:8000` -> `127.0.0.1:<free port>`, `listen 80` -> a free loopback
port, temp paths -> a temp dir), so what passes here is what compose runs.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO / "nginx"
STANDIN = Path(__file__).with_name("standin_upstream.py")
STARTUP_TIMEOUT_S = 120.0  # the app imports torch and loads + warms two models on 2 CPU cores


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in /usr/sbin (where Debian puts nginx, often off a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    sbin = Path("/usr/sbin") / name
    return str(sbin) if sbin.exists() else None


NGINX = find_binary("nginx")
PROMETHEUS = find_binary("prometheus")
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed (apt-get install nginx)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class Process:
    """A child process with its combined stdout/stderr in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def fail(self, why: str) -> None:
        pytest.fail(f"{self.name}: {why}\n--- log tail ---\n{log_tail(self.log_path)}")


def spawn(
    name: str,
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    with log_path.open("wb") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return Process(name, popen, log_path)


def wait_until(proc: Process, check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` (every 50 ms, bounded) until it is true; fail with the process log if not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            proc.fail(f"exited with {proc.popen.returncode} before {what}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    proc.fail(f"not {what} after {timeout_s:g}s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


# --- Stand-in upstreams ------------------------------------------------------------------


@dataclass
class Upstream:
    """A stand-in upstream process (standin_upstream.py) and what it received."""

    name: str
    port: int
    process: Process
    requests_log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, str]]:
        lines = self.requests_log.read_text().splitlines() if self.requests_log.exists() else []
        return [json.loads(line) for line in lines]


# --- NGINX ----------------------------------------------------------------------------------


def render_nginx(
    out_dir: Path, upstreams: dict[str, str], listen_port: int, extra: dict[str, str] | None = None
) -> Path:
    """Copy nginx/ into out_dir/conf with addresses, the port and temp paths substituted.

    upstreams maps the compose address in the files (`app:8000`) to a real one. `extra` is
    for test-only text replacements (e.g. a higher rate) and must each match.
    """
    conf_dir = out_dir / "conf"
    conf_dir.mkdir(parents=True)
    temp_dirs = "".join(
        f"    {kind}_temp_path {out_dir / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    applied: set[str] = set()
    for src in NGINX_DIR.iterdir():
        text = src.read_text()
        for old, new in {**upstreams, "listen 80;": f"listen 127.0.0.1:{listen_port};"}.items():
            text = text.replace(old, new)
        if "\nhttp {\n" in text:  # an entry file (the others are included inside it)
            text = text.replace("\nhttp {\n", "\nhttp {\n" + temp_dirs, 1)
            if os.geteuid() == 0:  # workers would run as `nobody`, locked out of the temp dir
                text = f"user {getpass.getuser()};\n" + text
        for old, new in (extra or {}).items():
            if old in text:
                text = text.replace(old, new)
                applied.add(old)
        (conf_dir / src.name).write_text(text)
    missing = set(extra or {}) - applied
    assert not missing, f"nginx/ no longer contains {missing}: update the test"
    return conf_dir


@dataclass
class Nginx:
    url: str
    process: Process


@dataclass
class App:
    url: str
    port: int
    process: Process
