"""Which exact model is serving: at load, every model resolves to an immutable version.

* A hub id resolves to the commit its files come from, read from the Hugging Face cache
  layout: `models--org--name/refs/<branch or tag>` names a commit, `snapshots/<commit>/` holds
  its files. The model is then loaded *at that commit*, so what is reported is what was loaded.
* A local folder resolves to a content hash of its files, `sha256-` + 40 hex digits (short
  enough for a Kubernetes label value). Hashing big weights takes seconds, so it happens once
  at load and the result is cached beside the files (`.model-version.json`, trusted while
  every file keeps its size and mtime). A read-only folder keeps it in memory, on the loaded
  model, for the life of the process. Nothing here runs on the request path.

A pinned revision that the disk does not hold stops the start, saying what is there instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")
CONTENT_HASH_PREFIX = "sha256-"
CACHE_FILE = ".model-version.json"
# The revision a local folder has when none is pinned (the settings' default is "main").
UNPINNED_FOLDER_REVISIONS = frozenset({"", "main"})
# A file written this close to the cache itself may change again within one mtime tick
# (git's "racy" entries): such a file is hashed again next time instead of trusted.
RACY_WINDOW_NS = 2_000_000_000


class RevisionMismatchError(RuntimeError):
    """The pinned revision is not what the disk holds; the message says what it holds."""


@dataclass(frozen=True)
class ModelVersion:
    revision: str  # immutable: a 40-hex commit, or "sha256-" + 40 hex for a local folder
    requested: str  # what the settings asked for: a branch, tag, commit or content hash
    source: Literal["hub-cache", "content-hash"]


def resolve_version(name: str, requested: str, hub_cache: Path) -> ModelVersion | None:
    """The version of a local folder or of a hub model in `hub_cache`; None if the hub model
    (at that revision) is not in the cache yet. Raises RevisionMismatchError."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder_version(folder, requested)
    commit = cached_commit(hub_cache, name, requested)
    return ModelVersion(commit, requested, "hub-cache") if commit is not None else None


# --- hub models: the cache layout ------------------------------------------------------------


def repo_cache_dir(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / ("models--" + repo_id.replace("/", "--"))


def cached_commit(hub_cache: Path, repo_id: str, requested: str) -> str | None:
    """The commit `requested` (a branch, tag or commit) names in the cache, if its snapshot
    is there."""
    repo_dir = repo_cache_dir(hub_cache, repo_id)
    commit: str | None = requested if COMMIT.match(requested) else None
    ref = repo_dir / "refs" / requested
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None or not (repo_dir / "snapshots" / commit).is_dir():
        return None
    return commit


def describe_cache(hub_cache: Path, repo_id: str) -> str:
    """What the cache holds for one repository, for an error message."""
    repo_dir = repo_cache_dir(hub_cache, repo_id)
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return f"the cache at {hub_cache} has no copy of {repo_id}"
    commits = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    refs_dir = repo_dir / "refs"
    refs = sorted(p for p in refs_dir.rglob("*") if p.is_file()) if refs_dir.is_dir() else []
    named = ", ".join(f"{p.relative_to(refs_dir)} -> {p.read_text().strip()}" for p in refs)
    return (
        f"{repo_dir} holds the commits {', '.join(commits) or '(none)'} (refs: {named or 'none'})"
    )


# --- local folders: a content hash -------------------------------------------------------------


def folder_version(folder: Path, requested: str) -> ModelVersion:
    revision = content_hash(folder)
    if requested not in UNPINNED_FOLDER_REVISIONS and requested != revision:
        raise RevisionMismatchError(
            f"{folder}: the pinned revision is {requested!r}, but its files hash to "
            f"{revision} (a local folder's revision is its content hash; 'main' accepts any)"
        )
    return ModelVersion(revision, requested, "content-hash")


def model_files(folder: Path) -> list[str]:
    """Every file under the folder, relative and sorted, except hidden ones (`.git/`, the
    `.cache/` of `huggingface-cli download --local-dir`, our own cache file)."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def content_hash(folder: Path) -> str:
    """The folder's content hash: from the cache file if no file changed, else computed."""
    files = model_files(folder)
    stats = {}
    for relative in files:
        stat = (folder / relative).stat()
        stats[relative] = [stat.st_size, stat.st_mtime_ns]
    cached = _read_cache(folder / CACHE_FILE)
    if cached is not None and _still_valid(cached, stats):
        return str(cached["revision"])
    started = time.perf_counter()
    revision = _hash_files(folder, files)
    log.info(
        "hashed %s: %d files, %.1f MB in %.2fs -> %s",
        folder,
        len(files),
        sum(size for size, _ in stats.values()) / 1e6,
        time.perf_counter() - started,
        revision,
    )
    _write_cache(folder / CACHE_FILE, {"revision": revision, "files": stats})
    return revision


def _hash_files(folder: Path, files: list[str]) -> str:
    # Names are part of the hash: renaming a shard changes the version too.
    digest = hashlib.sha256()
    for relative in files:
        with (folder / relative).open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{relative}\0{file_digest}\n".encode())
    return CONTENT_HASH_PREFIX + digest.hexdigest()[:40]


def _read_cache(path: Path) -> dict[str, object] | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) else None


def _still_valid(cached: dict[str, object], stats: dict[str, list[int]]) -> bool:
    written_ns = cached.get("written_ns")
    if cached.get("files") != stats or not isinstance(written_ns, int):
        return False
    return all(mtime_ns + RACY_WINDOW_NS <= written_ns for _, mtime_ns in stats.values())


def _write_cache(path: Path, entry: dict[str, object]) -> None:
    """Best effort: a read-only folder (an image layer, a mounted volume) is not an error."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(entry | {"written_ns": time.time_ns()}))
        os.replace(temporary, path)
    except OSError as exc:
        log.info("not caching the content hash beside %s (%s): kept in memory", path.parent, exc)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
