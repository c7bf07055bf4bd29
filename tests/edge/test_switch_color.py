"""scripts/switch_color.py refuses to switch to a colour that is not ready, and changes nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.edge.processes import REPO, Upstream, render_nginx
from tests.edge.test_edge_rollouts import closed_address

SCRIPT = REPO / "scripts" / "switch_color.py"


def run_switch(conf_dir: Path, colour: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(SCRIPT), colour, "--direct", "--nginx-dir", str(conf_dir)]
    return subprocess.run([*args, "--wait-s", "0"], capture_output=True, text=True, timeout=60)


def test_a_colour_that_is_not_ready_is_not_switched_to(
    standin: Callable[..., Upstream], tmp_path: Path
) -> None:
    blue = standin("blue")  # answers /ready with 200
    down = closed_address()
    conf_dir = render_nginx(tmp_path, {"app:8000": blue.address, "app-green:8000": down}, 8080)

    refused = run_switch(conf_dir, "green")
    assert refused.returncode == 1
    assert f"not switched (still blue): not ready after 0s: {down}" in refused.stderr
    assert not (conf_dir / "green.live").exists()

    to_blue = run_switch(conf_dir, "blue")
    assert to_blue.returncode == 0, to_blue.stderr
    assert "all new requests go to blue (was blue)" in to_blue.stdout
