"""A stand-in Hugging Face Hub on loopback: serves local folders as model repositories.

    python standin_hub.py --port P --repo demo-org/classifier=/path/to/folder@<40-hex commit> ...

It answers the few endpoints that `huggingface_hub` (HfApi().list_repo_files and
snapshot_download, as scripts/bake_weights.py calls them) uses: repo info at a revision, the
file tree, and HEAD/GET of each file under /resolve/. Any revision name resolves to the
repository's one commit. With HF_ENDPOINT pointing here, the real download code fills a real
Hugging Face cache (refs/main, snapshots/<commit>/, blobs/), as in an image build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rev>[^/?]+)")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


@dataclass(frozen=True)
class Repo:
    folder: Path
    commit: str

    def files(self) -> list[str]:
        return sorted(
            p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()
        )

    def etag(self, name: str) -> str:
        return hashlib.sha256((self.folder / name).read_bytes()).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repos: ClassVar[dict[str, Repo]] = {}  # set per server by make_handler

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _missing(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    def _api(self, match: re.Match[str]) -> None:
        repo = self.repos[match["repo"]]
        if match["what"] == "revision":
            siblings = [{"rfilename": name} for name in repo.files()]
            self._json({"id": match["repo"], "sha": repo.commit, "siblings": siblings})
            return
        tree = [
            {
                "type": "file",
                "path": name,
                "size": (repo.folder / name).stat().st_size,
                "oid": repo.etag(name)[:40],
            }
            for name in repo.files()
        ]
        self._json(tree)

    def _file(self, match: re.Match[str], send_body: bool) -> None:
        repo, name = self.repos[match["repo"]], match["file"]
        data = (repo.folder / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{repo.etag(name)}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _route(self, send_body: bool) -> None:
        api, resolve = API.match(self.path), RESOLVE.match(self.path)
        if api and api["repo"] in self.repos:
            self._api(api)
        elif resolve and resolve["file"] in self._files_of(resolve["repo"]):
            self._file(resolve, send_body)
        else:
            self._missing()

    def _files_of(self, repo_id: str) -> list[str]:
        repo = self.repos.get(repo_id)
        return repo.files() if repo else []

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        print(self.command, self.path, flush=True)


def make_handler(repos: dict[str, Repo]) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (HubHandler,), {"repos": repos})


def parse_repo(spec: str) -> tuple[str, Repo]:
    name, _, rest = spec.partition("=")
    folder, _, commit = rest.rpartition("@")
    return name, Repo(Path(folder), commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repo", action="append", required=True, help="ID=FOLDER@COMMIT")
    args = parser.parse_args()
    repos = dict(parse_repo(spec) for spec in args.repo)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(repos))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
