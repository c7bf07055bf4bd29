"""The image, without Docker: its file layout rebuilt from the Dockerfile, its weights baked
the way the build bakes them, and `python -m service` started from it offline.

What is real: the layout holds only what the Dockerfile copies (the test reads its COPY lines),
the environment is its ENV, scripts/bake_weights.py downloads through huggingface_hub from a
hub (a stand-in on loopback serving the demo models) into HF_HOME, and the service starts
from WORKDIR with HF_HUB_OFFLINE=1 and the hub gone. What stands in: this venv for the image's
`uv pip install -r pyproject.toml` (the test checks that it satisfies every requirement of
pyproject.toml), and DEVICE=cpu, QUANTIZATION=none for the image's GPU defaults.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import httpx
from harness import ManagedProcess, free_port, port_open, start_service
from packaging.requirements import Requirement

from tests.edge.dockerfile_recipe import Recipe, read_recipe
from tests.edge.processes import REPO, STARTUP_TIMEOUT_S

HUB = Path(__file__).with_name("standin_hub.py")
COMMITS = {
    "demo-org/classifier": "1111111111111111111111111111111111111111",
    "demo-org/llm": "2222222222222222222222222222222222222222",
}
BUILD_ARGS = {"PREDICT_MODEL": "demo-org/classifier", "GENERATE_MODEL": "demo-org/llm"}
ON_THIS_CPU = {"DEVICE": "cpu", "QUANTIZATION": "none"}  # the image's defaults are for a GPU


def in_layout(root: Path, image_path: str | PurePosixPath) -> Path:
    return root / str(image_path).lstrip("/")


def lay_out(recipe: Recipe, root: Path) -> None:
    for copy in recipe.copies:
        source, target = REPO / copy.source, in_layout(root, copy.destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def relocated(env: dict[str, str], root: Path) -> dict[str, str]:
    """The image's absolute paths (HF_HOME=/opt/hf, ...) inside the layout; PATH stays ours,
    since this interpreter stands in for the image's /opt/venv."""
    return {
        name: str(in_layout(root, value)) if value.startswith("/") and ":" not in value else value
        for name, value in env.items()
        if name != "PATH"
    }


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_the_image_labels_name_the_models_and_revisions_it_bakes() -> None:
    pinned = {"PREDICT_MODEL_REVISION": "a" * 40, "GENERATE_MODEL_REVISION": "b" * 40}
    labels = read_recipe(REPO / "Dockerfile", BUILD_ARGS | pinned).labels
    assert labels["model-serving.predict.model"] == "demo-org/classifier"
    assert labels["model-serving.predict.revision"] == "a" * 40
    assert labels["model-serving.generate.model"] == "demo-org/llm"
    assert labels["model-serving.generate.revision"] == "b" * 40
    assert labels["org.opencontainers.image.title"] == "model-serving"


def test_this_venv_has_every_package_the_image_installs() -> None:
    recipe = read_recipe(REPO / "Dockerfile", BUILD_ARGS)
    assert "-r pyproject.toml" in recipe.install  # the image installs pyproject's dependencies
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(version(requirement.name)), line


def test_the_image_layout_bakes_its_models_and_serves_them_offline(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = read_recipe(REPO / "Dockerfile", BUILD_ARGS)
    root = tmp_path / "image"
    lay_out(recipe, root)
    workdir = in_layout(root, recipe.copies[0].destination).parent  # /srv
    assert sorted(p.name for p in workdir.iterdir()) == [
        "batching",
        "pyproject.toml",
        "scripts",
        "service",
    ]

    # Bake, as the build's RUN does, from a hub that is then gone.
    port = free_port()
    repos = [
        f"--repo={name}={demo_models[name.split('/')[1]]}@{sha}" for name, sha in COMMITS.items()
    ]
    hub = ManagedProcess(
        "hub", [sys.executable, str(HUB), "--port", str(port), *repos], tmp_path / "hub.log"
    )
    hub.wait_until(lambda: port_open(port), 15, "listening")
    *assignments, python, script = recipe.bake
    assert python == "python"
    bake_env = relocated(recipe.env_at_bake | dict(a.split("=", 1) for a in assignments), root)
    bake_env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_XET": "1"}
    baked = subprocess.run(
        [sys.executable, str(in_layout(root, script))],
        env={"PATH": "/usr/bin:/bin", **bake_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    hub.stop()
    assert baked.returncode == 0, baked.stdout + baked.stderr
    hf_home = Path(bake_env["HF_HOME"])
    manifest = json.loads((hf_home / "baked-models.json").read_text())["models"]
    assert {m["name"]: m["commit"] for m in manifest} == COMMITS
    cache_before = files_of(hf_home)

    # Run it: WORKDIR, ENV and CMD of the image, nothing from this repository.
    env = relocated(recipe.env, root) | ON_THIS_CPU | {"PYTHONPATH": str(workdir)}
    env |= {"HF_HUB_CACHE": str(hf_home / "hub"), "RATE_LIMIT": "100000/minute"}
    assert recipe.cmd == ["python", "-m", "service"]
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import service, batching; print(service.__file__, batching.__file__)",
        ],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert all(Path(p).is_relative_to(workdir) for p in imported.stdout.split()), imported
    port = free_port()  # the image listens on 0.0.0.0:8000; here a free loopback port
    env |= {"HOST": "127.0.0.1", "PORT": str(port)}
    server = start_service(tmp_path / "service.log", env, cwd=workdir, port=port)
    try:
        server.wait_ready(STARTUP_TIMEOUT_S)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            predicted = client.post("/predict", json={"text": "from the image"})
            generated = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4})
            info = client.get("/info").json()
    finally:
        server.stop()
    assert predicted.status_code == 200 and generated.status_code == 200, server.log_tail()
    assert predicted.headers["X-Model-Revision"] == COMMITS["demo-org/classifier"]
    assert generated.headers["X-Model-Revision"] == COMMITS["demo-org/llm"]
    assert info["predict"]["revision"] == COMMITS["demo-org/classifier"]
    assert info["generate"]["revision_source"] == "hub-cache"
    assert files_of(hf_home) == cache_before  # served from a read-only cache as well
