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
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import HttpServer, ManagedProcess

REPO = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO / "nginx"
COMPOSE_MOUNT = "/etc/nginx/edge/"  # where compose.yaml mounts nginx/
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


# --- Stand-in upstreams ------------------------------------------------------------------


@dataclass
class Upstream:
    """A stand-in upstream process (standin_upstream.py) and what it received."""

    name: str
    port: int
    process: ManagedProcess
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
    """Copy nginx/ into out_dir/conf with addresses, the port and paths substituted.

    upstreams maps the compose address in the files (`app:8000`) to a real one. Temp paths go
    to out_dir, and compose's mount point of nginx/ (/etc/nginx/edge/) to out_dir/conf. `extra`
    is for test-only text replacements (e.g. a higher rate) and must each match.
    """
    conf_dir = out_dir / "conf"
    conf_dir.mkdir(parents=True)
    paths = {"listen 80;": f"listen 127.0.0.1:{listen_port};", COMPOSE_MOUNT: f"{conf_dir}/"}
    temp_dirs = "".join(
        f"    {kind}_temp_path {out_dir / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    applied: set[str] = set()
    for src in NGINX_DIR.glob("*.conf"):  # not a developer's runtime state (green.live)
        text = src.read_text()
        for old, new in {**upstreams, **paths}.items():
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
    process: ManagedProcess
    conf_dir: Path  # the rendered configuration it runs


App = HttpServer  # the real app: `python -m service` on a free port
