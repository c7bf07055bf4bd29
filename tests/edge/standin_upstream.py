"""A stand-in upstream for the NGINX tests that do not need a model (canary split, shadow).

    python standin_upstream.py --port P --name canary --log requests.jsonl [--status 500]
                               [--delay-s 2] [--hang-up]

Answers every request with `{"upstream": NAME, "path": ...}` (or an error status) and appends
one JSON line per request to --log, so a test can count what reached it. With --hang-up it
reads each request and closes the connection without an answer, as a replica that dies in
the middle of a request does. Runs as its own process, like the real app, so NGINX talks to
a real socket.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(
    name: str, status: int, delay_s: float, log_path: Path, hang_up: bool = False
) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as NGINX's upstream `keepalive` expects
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            record = {
                "name": name,
                "method": self.command,
                "path": self.path,
                "request_id": self.headers.get("X-Request-ID", ""),
                "body": body,
            }
            with lock, log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            if delay_s:
                time.sleep(delay_s)
            if hang_up:
                self.close_connection = True
                return
            payload = json.dumps({"upstream": name, "path": self.path}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Request-ID", record["request_id"])
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass  # the JSON lines are the log

    return Handler


class StandinServer(ThreadingHTTPServer):
    # NGINX opens a new connection per mirrored request: the default listen backlog of 5
    # would drop connections in a burst (uvicorn's is 2048).
    request_queue_size = 1024
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--hang-up", action="store_true")
    args = parser.parse_args()
    args.log.touch()
    handler = make_handler(args.name, args.status, args.delay_s, args.log, args.hang_up)
    server = StandinServer(("127.0.0.1", args.port), handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
