"""The first streamed /generate after start-up, through NGINX: does it stream like the next one?

    python scripts/bench/bench_first_stream.py --trials 5 [--checkout OTHER_TREE ...]

Each trial starts a fresh stack (`python -m service` with the demo models, then NGINX with
nginx/nginx.conf), exactly as tests/edge does, and streams /generate twice (64 tokens). Per
stream it reports when the first event reached the client after the server's own first token
(`first event - TTFT`: both counted from the request, so this is the delivery delay plus the
HTTP overhead) and how much of the decode the events were spread over (`spread`: from the
first event to the last, over the server's decode time; a stream held back and then sent in a
burst scores low, tests/edge/test_edge_app.py asks >= 0.5). With `--checkout`, the trials
alternate between this tree and each other source tree (an unpacked `git archive`), so that a
before/after comparison shares the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests/edge

from harness import ManagedProcess, free_port, port_open, start_service
from make_demo_models import build_demo_models

from tests.edge.processes import NGINX, render_nginx

REPO = Path(__file__).resolve().parents[2]
BODY = {"prompt": "hello", "max_new_tokens": 64, "stream": True}


def stream_once(url: str) -> dict[str, float]:
    start = time.perf_counter()
    arrivals_s: list[float] = []
    lines: list[str] = []
    with httpx.stream("POST", url + "/generate", json=BODY, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals_s.append(time.perf_counter() - start)
                lines.append(line)
    timings = json.loads(lines[-2].removeprefix("data:"))["timings"]
    decode_s = (timings["total_ms"] - timings["ttft_ms"]) / 1000
    return {
        "delay_ms": arrivals_s[0] * 1000 - timings["ttft_ms"],
        "spread": (arrivals_s[-1] - arrivals_s[0]) / decode_s,
    }


def trial(tree: Path, models: dict[str, Path], work: Path) -> list[dict[str, float]]:
    """A fresh app from `tree` behind a fresh NGINX; its first two streams."""
    work.mkdir(parents=True)
    env = {
        "PREDICT_MODEL": str(models["classifier"]),
        "GENERATE_MODEL": str(models["llm"]),
        "DEVICE": "cpu",
        "GENERATE_SLOTS": "4",
        "GENERATE_MAX_SEQ_LEN": "256",
        "RATE_LIMIT": "100000/minute",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(tree),
    }
    app = start_service(work / "app.log", env, cwd=work)
    nginx = None
    try:
        app.wait_ready(300)
        port = free_port()
        conf = render_nginx(work / "nginx", {"app:8000": f"127.0.0.1:{app.port}"}, port)
        args = [
            str(NGINX),
            "-p",
            str(work / "nginx"),
            "-e",
            "stderr",
            "-c",
            str(conf / "nginx.conf"),
        ]
        args += ["-g", f"daemon off; pid {work / 'nginx' / 'nginx.pid'};"]
        nginx = ManagedProcess("nginx", args, work / "nginx.log")
        nginx.wait_until(lambda: port_open(port), 10, "listening")
        url = f"http://127.0.0.1:{port}"
        return [stream_once(url), stream_once(url)]
    finally:
        if nginx is not None:
            nginx.stop()
        app.stop()


def report(name: str, runs: list[list[dict[str, float]]]) -> None:
    for index, label in enumerate(("first stream", "second stream")):
        delays = [run[index]["delay_ms"] for run in runs]
        spreads = [run[index]["spread"] for run in runs]
        print(
            f"{name:>12} {label:13} n={len(runs)}  first event - TTFT: median "
            f"{statistics.median(delays):6.1f} ms, max {max(delays):6.1f} ms   spread: median "
            f"{statistics.median(spreads):.2f}, min {min(spreads):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--checkout", type=Path, action="append", default=[])
    args = parser.parse_args()
    if NGINX is None:
        sys.exit("nginx is not installed (apt-get install nginx)")
    trees = {"this tree": REPO} | {str(tree): tree.resolve() for tree in args.checkout}
    work = Path(tempfile.mkdtemp(prefix="first_stream_"))
    try:
        models = build_demo_models(work / "models")
        runs: dict[str, list[list[dict[str, float]]]] = {name: [] for name in trees}
        for n in range(args.trials):
            for name, tree in trees.items():  # interleaved: both see the same load
                runs[name].append(trial(tree, models, work / f"{n}-{len(runs[name])}-{tree.name}"))
        for name, results in runs.items():
            report(name, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
