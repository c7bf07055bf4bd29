"""The first streamed /generate after start-up, through NGINX: does it stream like the next one?

    python scripts/bench/bench_first_stream.py --trials 5 [--checkout OTHER_TREE ...]

Each trial starts a fresh stack (`python -m service` with the demo models, under
first_stream_probe.py's timestamps, then NGINX with nginx/nginx.conf), as tests/edge does,
streams /generate twice (64 tokens), then keeps streaming for `--serve-s` seconds. Reported
per tree: for the first and the second stream, the time from the engine's first token to the
app sending it (the delivery delay; the first stream used to pay start-up work here) and how
much of the decode the events reached the client over (`spread`, the last event minus the
first over the server's decode time; tests/edge/test_edge_app.py asks >= 0.5); and the longest
garbage-collection pause from /ready on, the drain at the end included (every thread
waits for it). With `--checkout`, trials
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
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests/edge

from harness import ManagedProcess, free_port, port_open, start_service
from make_demo_models import build_demo_models

from tests.edge.processes import NGINX, render_nginx

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("first_stream_probe.py")
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
    return {"spread": (arrivals_s[-1] - arrivals_s[0]) / decode_s}


def token_to_send_ms(events: list[dict[str, Any]]) -> list[float]:
    """Per /generate request: its first token's flush by the engine -> its first body sent."""
    delays = []
    for request in (e for e in events if e["kind"] == "request"):
        after = [e for e in events if e["t"] >= request["t"]]
        flushed = next(e["t"] for e in after if e["kind"] == "flush")
        sent = next(e["t"] for e in after if e["kind"] == "send")
        delays.append((sent - flushed) * 1000)
    return delays


def trial(tree: Path, models: dict[str, Path], work: Path, serve_s: float) -> dict[str, Any]:
    """A fresh app from `tree` behind a fresh NGINX: its first two streams, then serving."""
    work.mkdir(parents=True)
    probe_log = work / "probe.jsonl"
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
        "FIRST_STREAM_PROBE_LOG": str(probe_log),
    }
    command = (sys.executable, str(PROBE))
    app = start_service(work / "app.log", env, cwd=work, command=command)
    nginx = None
    try:
        app.wait_ready(300)
        serving_from = time.time()  # traffic may come as soon as /ready says 200
        port = free_port()
        conf = render_nginx(work / "nginx", {"app:8000": f"127.0.0.1:{app.port}"}, port)
        args = [str(NGINX), "-p", str(work / "nginx"), "-e", "stderr"]
        args += ["-c", str(conf / "nginx.conf"), "-g", f"daemon off; pid {work / 'nginx.pid'};"]
        nginx = ManagedProcess("nginx", args, work / "nginx.log")
        nginx.wait_until(lambda: port_open(port), 10, "listening")
        url = f"http://127.0.0.1:{port}"
        streams = [stream_once(url), stream_once(url)]
        while time.time() < serving_from + serve_s:
            stream_once(url)
    finally:
        if nginx is not None:
            nginx.stop()
        app.stop()  # a drain serves too: its pauses count
    events = [json.loads(line) for line in probe_log.read_text().splitlines()]
    pauses = [e["ms"] for e in events if e["kind"] == "gc" and e["t"] >= serving_from]
    first, second = token_to_send_ms(events)[:2]
    return {
        "delay_ms": [first, second],
        "spread": [streams[0]["spread"], streams[1]["spread"]],
        "gc_ms": max(pauses, default=0.0),
    }


def report(name: str, runs: list[dict[str, Any]]) -> None:
    for index, label in enumerate(("first stream", "second stream")):
        delays = [run["delay_ms"][index] for run in runs]
        spreads = [run["spread"][index] for run in runs]
        print(
            f"{name:>12} {label:13} n={len(runs)}  first token -> sent: median "
            f"{statistics.median(delays):6.1f} ms, max {max(delays):6.1f} ms   spread: median "
            f"{statistics.median(spreads):.2f}, min {min(spreads):.2f}"
        )
    pauses = [run["gc_ms"] for run in runs]
    print(
        f"{name:>12} longest GC pause from /ready on: median {statistics.median(pauses):6.1f} ms, "
        f"max {max(pauses):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--checkout", type=Path, action="append", default=[])
    parser.add_argument("--serve-s", type=float, default=8.0, help="streaming after the first two")
    args = parser.parse_args()
    if NGINX is None:
        sys.exit("nginx is not installed (apt-get install nginx)")
    trees = {"this tree": REPO} | {str(tree): tree.resolve() for tree in args.checkout}
    work = Path(tempfile.mkdtemp(prefix="first_stream_"))
    try:
        models = build_demo_models(work / "models")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for n in range(args.trials):
            for name, tree in trees.items():  # interleaved: both see the same load
                runs[name].append(trial(tree, models, work / f"{n}-{tree.name}", args.serve_s))
        for name, results in runs.items():
            report(name, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
