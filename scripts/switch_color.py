"""Blue-green: send all traffic to one colour, once every replica of it is ready.

    python scripts/switch_color.py green       # compose: checks run in the nginx container
    python scripts/switch_color.py blue        # and back
    python scripts/switch_color.py green --direct   # NGINX and the apps on this host

1. Reads the colour's replicas from nginx/nginx.bluegreen.conf (`upstream green { server ...; }`).
2. Waits, up to --wait-s, until each one answers /ready with 200; otherwise changes nothing.
   With compose the check runs inside the nginx container, over the network NGINX uses.
3. Flips the live colour: creates nginx/green.live, or removes it for blue. NGINX looks for
   that file on every request, so there is no reload: requests and streams already running
   finish where they are, and every new one goes to the new colour.

The other colour keeps running, so switching back is the same command with its name.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

NGINX_DIR = Path(__file__).resolve().parents[1] / "nginx"
ENTRY_FILE = "nginx.bluegreen.conf"
GREEN_FLAG = "green.live"  # present: green is live; absent: blue (nginx.bluegreen.conf)
COLOURS = ("blue", "green")
POLL_S = 1.0
COMPOSE_EXEC = ("docker", "compose", "exec", "-T", "nginx")


class SwitchRefused(RuntimeError):
    """The colour is not ready or not configured; the live colour is unchanged."""


def replicas(nginx_dir: Path, colour: str) -> list[str]:
    """The `host:port` of each server in the colour's upstream block."""
    text = (nginx_dir / ENTRY_FILE).read_text()
    block = re.search(rf"upstream\s+{colour}\s*\{{(.*?)\}}", text, re.DOTALL)
    if block is None:
        raise SwitchRefused(f"{ENTRY_FILE} has no `upstream {colour}` block")
    return re.findall(r"^\s*server\s+(\S+?)[\s;]", block.group(1), re.MULTILINE)


def live_colour(nginx_dir: Path) -> str:
    return "green" if (nginx_dir / GREEN_FLAG).exists() else "blue"


def ready_here(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def ready_in_compose(address: str) -> bool:
    check = [*COMPOSE_EXEC, "wget", "-q", "-O", "/dev/null", f"http://{address}/ready"]
    return subprocess.run(check, capture_output=True, timeout=30).returncode == 0


def wait_until_ready(addresses: list[str], ready: Callable[[str], bool], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    waiting = list(addresses)
    while waiting:
        waiting = [address for address in waiting if not ready(address)]
        if waiting and time.monotonic() >= deadline:
            raise SwitchRefused(f"not ready after {wait_s:g}s: {', '.join(waiting)}")
        if waiting:
            time.sleep(POLL_S)


def make_live(nginx_dir: Path, colour: str) -> None:
    flag = nginx_dir / GREEN_FLAG
    if colour == "blue":
        flag.unlink(missing_ok=True)
        return
    # Written beside it, then renamed: NGINX never sees a half-made switch.
    temporary = flag.with_name(f".{GREEN_FLAG}.{os.getpid()}")
    temporary.write_text("green is live: written by scripts/switch_color.py\n")
    temporary.replace(flag)


def switch(nginx_dir: Path, colour: str, ready: Callable[[str], bool], wait_s: float) -> None:
    addresses = replicas(nginx_dir, colour)
    if not addresses:
        raise SwitchRefused(f"upstream {colour} lists no server")
    wait_until_ready(addresses, ready, wait_s)
    make_live(nginx_dir, colour)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("colour", choices=COLOURS)
    parser.add_argument("--nginx-dir", type=Path, default=NGINX_DIR)
    parser.add_argument("--wait-s", type=float, default=600.0, help="how long to wait for ready")
    parser.add_argument("--direct", action="store_true", help="check /ready from this host")
    args = parser.parse_args(argv)
    before = live_colour(args.nginx_dir)
    ready = ready_here if args.direct else ready_in_compose
    try:
        switch(args.nginx_dir, args.colour, ready, args.wait_s)
    except SwitchRefused as refused:
        print(f"not switched (still {before}): {refused}", file=sys.stderr)
        return 1
    print(f"all new requests go to {args.colour} (was {before})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
