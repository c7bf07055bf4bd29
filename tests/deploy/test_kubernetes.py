"""deploy/kubernetes renders with the real kustomize, validates strictly against the Kubernetes
API schemas, and keeps the promises the README makes: probes, drain arithmetic, rollout on
one-GPU nodes, non-root pods, tracks kept apart, and autoscalers on metrics the app exports."""

from __future__ import annotations

import base64
import re

import httpx
import kubernetes_validate
import pytest
import yaml
from metrics_text import parse_metrics

from service.__main__ import SHUTDOWN_AFTER_DRAIN_S
from service.runtime import AFTER_DRAIN_STOP_S
from service.settings import Settings
from tests.conftest import REPO
from tests.deploy.kustomize import (
    BUILDS,
    KUBERNETES,
    Obj,
    named,
    of_kind,
    render,
    selects,
    server_container,
    settings_of,
)

# The oldest release the manifests claim (README) and the newest schemas we have.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Custom resources: no schema in kubernetes-validate; test_custom_resources_* checks them (and
# test_inference_gateway.py the Gateway API and inference extension ones).
CRD_GROUPS = (
    "monitoring.coreos.com/",
    "keda.sh/",
    "gateway.networking.k8s.io/",
    "inference.networking.k8s.io/",
)
SERVER_BUILDS = tuple(b for b in BUILDS if b != "dcgm-exporter")
COLD_LOAD_S = 600


def deployments(build: str) -> list[Obj]:
    """The model server Deployments (overlays/inference-gateway adds the endpoint picker's)."""
    return [d for d in of_kind(render(build), "Deployment") if is_server(d)]


def is_server(deployment: Obj) -> bool:
    return pod_labels(deployment).get("app.kubernetes.io/component") == "server"


def pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


# Every model server Deployment of every build, named here so that collection renders nothing
# (test_every_server_deployment_is_checked keeps the list complete).
SERVER_DEPLOYMENTS = [
    *((build, "model-serving") for build in SERVER_BUILDS),
    ("overlays/canary", "model-serving-canary"),
    ("overlays/shadow", "model-serving-shadow"),
]


def all_server_deployments() -> list[tuple[str, Obj]]:
    return [(b, named(render(b), "Deployment", name)) for b, name in SERVER_DEPLOYMENTS]


def test_every_server_deployment_is_checked():
    rendered = {(b, d["metadata"]["name"]) for b in SERVER_BUILDS for d in deployments(b)}
    assert rendered == set(SERVER_DEPLOYMENTS)


@pytest.mark.parametrize("build", BUILDS)
def test_every_build_renders_and_its_builtin_objects_validate_strictly(build):
    objects = render(build)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{build}: {obj['kind']}/{obj['metadata']['name']} ({version}): {exc}")


def test_custom_resources_are_only_the_expected_kinds():
    kinds = {
        (obj["apiVersion"], obj["kind"])
        for build in BUILDS
        for obj in render(build)
        if obj["apiVersion"].startswith(CRD_GROUPS)
    }
    assert kinds == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("inference.networking.k8s.io/v1", "InferencePool"),
    }


@pytest.mark.parametrize("build", ["base", "overlays/canary", "dcgm-exporter"])
def test_custom_resources_service_monitor_selects_a_service_port(build):
    objects = render(build)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in of_kind(objects, "Service") if selects(selector, s["metadata"]["labels"])
    ]
    assert services, "the ServiceMonitor selects no Service"
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    if build == "overlays/canary":  # both tracks scraped, told apart by `role`
        assert {s["metadata"]["name"] for s in services} == {
            "model-serving",
            "model-serving-canary",
        }
        (relabel,) = monitor["spec"]["endpoints"][0]["relabelings"]
        assert relabel == {
            "sourceLabels": ["__meta_kubernetes_pod_label_track"],
            "targetLabel": "role",
        }


@pytest.mark.parametrize("build", ["overlays/keda", "overlays/inference-gateway"])
def test_custom_resources_scaled_object_has_its_required_fields(build):
    objects = render(build)
    (scaled,) = of_kind(objects, "ScaledObject")
    target = named(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert scaled["metadata"]["namespace"] == target["metadata"]["namespace"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["triggers"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http")
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0
        # The series it reads are the target's: its namespace and its pods' track (role).
        assert f'namespace="{target["metadata"]["namespace"]}"' in meta["query"]
        assert f'role="{pod_labels(target)["track"]}"' in meta["query"]


@pytest.mark.parametrize(("build", "name"), SERVER_DEPLOYMENTS)
def test_probes_check_ready_and_health_on_the_http_port(build, name):
    deployment = named(render(build), "Deployment", name)
    container = server_container(deployment)
    (port,) = container["ports"]
    image_port = re.search(r"\bPORT=(\d+)", (REPO / "Dockerfile").read_text())
    assert image_port
    assert (port["name"], port["containerPort"]) == ("http", int(image_port.group(1)))
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": ("/ready", "http"),
        "readinessProbe": ("/ready", "http"),
        "livenessProbe": ("/health", "http"),
    }
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= COLD_LOAD_S


@pytest.mark.parametrize(("build", "name"), SERVER_DEPLOYMENTS)
def test_grace_period_outlasts_the_prestop_sleep_the_drain_and_the_engines_stop(build, name):
    deployment = named(render(build), "Deployment", name)
    container = server_container(deployment)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    settings = settings_of(render(build), deployment)
    fields = Settings.model_fields
    drain_s = float(settings.get("DRAIN_TIMEOUT_S", fields["drain_timeout_s"].default))
    quiet_s = float(settings.get("DRAIN_QUIET_S", fields["drain_quiet_s"].default))
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop, then the drain, then uvicorn closes what is left, then each engine stops.
    after_drain_s = SHUTDOWN_AFTER_DRAIN_S + 2 * AFTER_DRAIN_STOP_S
    assert grace_s > float(command[1]) + drain_s + quiet_s + after_drain_s


def test_rolling_update_frees_a_gpu_before_it_starts_a_pod():
    for _, deployment in all_server_deployments():
        strategy = deployment["spec"]["strategy"]
        assert strategy == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }


def test_pods_ask_for_one_gpu_and_run_as_the_images_user_without_privileges():
    image_user = re.search(r"^USER (\d+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert image_user
    for _, deployment in all_server_deployments():
        pod = deployment["spec"]["template"]["spec"]
        container = server_container(deployment)
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert {"cpu", "memory"} <= resources["requests"].keys()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(image_user.group(1))
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("build", SERVER_BUILDS)
def test_pdb_and_stable_service_select_the_stable_pods_only(build):
    objects = render(build)
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    stable = named(objects, "Service", "model-serving")
    for deployment in deployments(build):
        labels = pod_labels(deployment)
        is_stable = deployment["metadata"]["name"] == "model-serving"
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels) is is_stable
        assert selects(stable["spec"]["selector"], labels) is is_stable
        # Each Deployment's own selector matches its pods (kubectl would refuse it otherwise).
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize(
    ("build", "track"), [("overlays/canary", "canary"), ("overlays/shadow", "shadow")]
)
def test_second_track_has_its_own_service_settings_and_image(build, track):
    objects = render(build)
    name = f"model-serving-{track}"
    deployment = named(objects, "Deployment", name)
    assert pod_labels(deployment)["track"] == track
    assert selects(named(objects, "Service", name)["spec"]["selector"], pod_labels(deployment))
    assert server_container(deployment)["image"].endswith(f":{track}")

    def settings_name(d: Obj) -> str:
        return server_container(d)["envFrom"][0]["configMapRef"]["name"]

    stable = named(objects, "Deployment", "model-serving")
    assert settings_name(deployment).startswith(f"model-serving-settings-{track}-")
    assert settings_name(deployment) != settings_name(stable)
    if track == "shadow":
        assert settings_of(objects, deployment)["GENERATE_CANCEL_ON_DISCONNECT"] == "false"


@pytest.mark.parametrize(("build", "name"), SERVER_DEPLOYMENTS)
def test_model_ids_and_revisions_are_in_each_pods_labels_and_env(build, name):
    deployment = named(render(build), "Deployment", name)
    settings = settings_of(render(build), deployment)
    template = deployment["spec"]["template"]["metadata"]
    for task in ("predict", "generate"):
        key = task.upper() + "_MODEL"
        assert (
            template["labels"][f"model-serving.io/{task}-revision"] == settings[key + "_REVISION"]
        )
        assert template["annotations"][f"model-serving.io/{task}-model"] == settings[key]


def test_api_keys_come_from_a_secret_and_only_the_example_is_shipped():
    objects = render("base")
    (secret,) = of_kind(objects, "Secret")
    env = {
        e["name"]: e for e in server_container(named(objects, "Deployment", "model-serving"))["env"]
    }
    assert env["API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"]["API_KEYS"]).decode() == "replace-me-before-deploying"
    assert "API_KEYS" not in settings_of(objects, named(objects, "Deployment", "model-serving"))
    assert "deploy/kubernetes/**/api-keys.env" in (REPO / ".gitignore").read_text()


def test_ingresses_carry_the_edge_rules_and_never_route_metrics():
    objects = render("base")
    ingresses = {i["metadata"]["name"]: i for i in of_kind(objects, "Ingress")}
    notes = {name: i["metadata"].get("annotations", {}) for name, i in ingresses.items()}
    prefix = "nginx.ingress.kubernetes.io/"
    generate = notes["model-serving-generate"]
    assert generate[prefix + "proxy-buffering"] == "off"
    assert int(generate[prefix + "proxy-read-timeout"]) >= 300
    for name in ("model-serving-predict", "model-serving-generate", "model-serving-api"):
        assert notes[name][prefix + "proxy-body-size"] == "1m"
        assert int(notes[name][prefix + "limit-rps"]) > 0
        assert notes[name][prefix + "proxy-next-upstream"] == "http_503 non_idempotent"
    assert not any(key.startswith(prefix + "limit") for key in notes["model-serving-probes"])
    paths = [
        path["path"]
        for ingress in ingresses.values()
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert {"/predict", "/generate", "/v1", "/health", "/ready"} <= set(paths)
    assert not any(p == "/" or p.startswith("/metrics") for p in paths)


def test_canary_ingress_sends_a_weight_of_the_stable_paths_to_the_canary():
    objects = render("overlays/canary")
    canary = named(objects, "Ingress", "model-serving-canary")
    notes = canary["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/canary"] == "true"
    assert 0 <= int(notes["nginx.ingress.kubernetes.io/canary-weight"]) <= 100
    stable_paths = {
        (p["path"], p["pathType"])
        for i in of_kind(objects, "Ingress")
        if i is not canary
        for r in i["spec"]["rules"]
        for p in r["http"]["paths"]
    }
    for path in canary["spec"]["rules"][0]["http"]["paths"]:
        assert (path["path"], path["pathType"]) in stable_paths  # ingress-nginx pairs them
        assert path["backend"]["service"]["name"] == "model-serving-canary"


def test_shadow_overlay_mirrors_work_requests_to_the_shadow_service():
    objects = render("overlays/shadow")
    shadow = named(objects, "Service", "model-serving-shadow")
    target = (
        f"http://{shadow['metadata']['name']}.{shadow['metadata']['namespace']}.svc.cluster.local"
    )
    for name in ("model-serving-predict", "model-serving-generate"):
        notes = named(objects, "Ingress", name)["metadata"]["annotations"]
        mirror = notes["nginx.ingress.kubernetes.io/mirror-target"]
        assert mirror == target + "$request_uri"
    assert shadow["spec"]["ports"][0]["port"] == 80  # the port the mirror URL implies


@pytest.mark.parametrize("build", ["overlays/keda", "overlays/hpa", "overlays/inference-gateway"])
def test_autoscaled_deployment_leaves_the_replica_count_to_the_autoscaler(build):
    objects = render(build)
    assert "replicas" not in named(objects, "Deployment", "model-serving")["spec"]
    assert "replicas" in named(render("base"), "Deployment", "model-serving")["spec"]


def test_hpa_asks_for_metrics_the_adapter_rules_serve():
    (hpa,) = of_kind(render("overlays/hpa"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "model-serving"
    asked = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert asked and asked <= served


def adapter_rules() -> list[dict]:
    values = yaml.safe_load(
        (KUBERNETES / "overlays" / "hpa" / "prometheus-adapter-values.yaml").read_text()
    )
    return values["rules"]["custom"]


def series_names(promql: str) -> set[str]:
    """The metric names a query reads: identifiers followed by a label matcher."""
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", promql))


def autoscaler_series() -> set[str]:
    (scaled,) = of_kind(render("overlays/keda"), "ScaledObject")
    names = {n for t in scaled["spec"]["triggers"] for n in series_names(t["metadata"]["query"])}
    for rule in adapter_rules():
        names |= series_names(rule["seriesQuery"])
        names |= series_names(
            rule["metricsQuery"].replace("<<.Series>>", "").replace("<<.LabelMatchers>>", "")
        )
    return names


def test_every_metric_the_autoscalers_read_is_in_the_apps_metrics(start_server, demo_models):
    wanted = autoscaler_series()
    assert {"generate_waiting_requests", "generate_slots_in_use", "predict_queue_depth"} <= wanted
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]), GENERATE_MODEL=str(demo_models["llm"])
    )
    text = httpx.get(server.url + "/metrics", timeout=30).text
    exported = {key.split("{")[0] for key in parse_metrics(text)}
    assert wanted - exported == set()
