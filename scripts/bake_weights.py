"""Download the configured models into the Hugging Face cache at build time (Docker).

    python scripts/bake_weights.py [--predict-model ID] [--predict-revision REV]
                                   [--generate-model ID] [--generate-revision REV]

Defaults come from PREDICT_MODEL / PREDICT_MODEL_REVISION / GENERATE_MODEL /
GENERATE_MODEL_REVISION, the same variables the service reads, and the files land in
HF_HOME. At run time the service sets HF_HUB_OFFLINE=1 and loads them from that cache with
the same id and revision. An empty model is skipped (that endpoint is disabled); a local
directory is skipped (nothing to download). Prints each resolved commit: pin it as the
revision for reproducible builds.

What was baked is recorded in a manifest inside the image, $HF_HOME/baked-models.json by
default (--manifest): each model's id, the revision asked for and the commit it resolved to,
its file count and size. The service reports the same commit at run time (/info).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Weight formats other frameworks use; the service loads PyTorch weights only.
FOREIGN_WEIGHTS = [
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.tflite",
    "*.gguf",
    "*.mlmodel",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]
# When safetensors exist, the pickled copies of the same weights are dead weight.
PICKLED_WEIGHTS = ["*.bin", "*.pt", "*.pth"]


@dataclass(frozen=True)
class ModelSpec:
    """One model to bake: the name the service is configured with and its revision."""

    role: str
    name: str
    revision: str


def ignore_patterns(repo_files: list[str]) -> list[str]:
    """Files not to download, given the repository's file list."""
    patterns = list(FOREIGN_WEIGHTS)
    if any(f.endswith(".safetensors") for f in repo_files):
        patterns += PICKLED_WEIGHTS
    return patterns


def bake(spec: ModelSpec) -> dict[str, Any]:
    """Download one model into the cache, or say why it is skipped; its manifest entry."""
    entry: dict[str, Any] = asdict(spec)
    if not spec.name:
        print(f"{spec.role}: no model configured, skipped")
        return entry | {"skipped": "no model configured"}
    if Path(spec.name).is_dir():
        print(f"{spec.role}: {spec.name} is a local directory, nothing to download")
        return entry | {"skipped": "a local directory"}
    # Imported here so `--help` and the skip paths work without huggingface_hub installed.
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(spec.name, revision=spec.revision)
    path = Path(
        snapshot_download(spec.name, revision=spec.revision, ignore_patterns=ignore_patterns(files))
    )
    fetched = [p for p in path.rglob("*") if p.is_file()]
    size_bytes = sum(p.stat().st_size for p in fetched)
    # The snapshot directory is named after the commit the revision resolved to.
    print(
        f"{spec.role}: {spec.name}@{spec.revision} -> commit {path.name}, "
        f"{len(fetched)} files, {size_bytes / 1e6:.1f} MB in {path}"
    )
    return entry | {"commit": path.name, "files": len(fetched), "bytes": size_bytes}


def default_manifest() -> Path:
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "baked-models.json"


def parse_args(argv: list[str] | None = None) -> tuple[list[ModelSpec], Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = os.environ.get
    parser.add_argument("--manifest", type=Path, default=default_manifest())
    parser.add_argument("--predict-model", default=env("PREDICT_MODEL", ""))
    parser.add_argument("--predict-revision", default=env("PREDICT_MODEL_REVISION") or "main")
    parser.add_argument("--generate-model", default=env("GENERATE_MODEL", ""))
    parser.add_argument("--generate-revision", default=env("GENERATE_MODEL_REVISION") or "main")
    args = parser.parse_args(argv)
    specs = [
        ModelSpec("predict", args.predict_model.strip(), args.predict_revision),
        ModelSpec("generate", args.generate_model.strip(), args.generate_revision),
    ]
    return specs, args.manifest


def main(argv: list[str] | None = None) -> int:
    print(f"HF_HOME={os.environ.get('HF_HOME', '(default: ~/.cache/huggingface)')}")
    specs, manifest = parse_args(argv)
    entries = [bake(spec) for spec in specs]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
