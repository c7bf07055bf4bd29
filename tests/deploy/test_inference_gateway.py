"""overlays/inference-gateway: the InferencePool, the endpoint picker (EPP) and the Gateway route
render with the real kustomize, validate against their APIs' schemas (deploy/kubernetes/schemas),
and point at each other and at our pods. (test_kubernetes.py validates the overlay's built-in
kinds strictly, as for every build; tests/service/test_model_server_protocol.py finds every
metric the picker and KEDA read in a real /metrics.)"""

from __future__ import annotations

import copy
import re
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from service.settings import Settings
from tests.deploy.kustomize import KUBERNETES, Obj, named, of_kind, render, selects, settings_of

BUILD = "overlays/inference-gateway"
SCHEMAS = KUBERNETES / "schemas"
SCHEMA_OF_KIND = {
    "InferencePool": "inferencepool.v1.yaml",
    "Gateway": "gateway.v1.yaml",
    "HTTPRoute": "httproute.v1.yaml",
}
CONFIG_SCHEMA = "endpointpickerconfig.v1alpha1.yaml"
GATEWAY_GROUPS = ("inference.networking.k8s.io/", "gateway.networking.k8s.io/")
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"


@cache
def registry() -> Registry:
    resources = [
        (path.name, Resource.from_contents(yaml.safe_load(path.read_text())))
        for path in SCHEMAS.glob("*.yaml")
    ]
    return Registry().with_resources(resources)


def validator(schema_file: str) -> jsonschema.Draft202012Validator:
    schema = registry().contents(schema_file)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry())


def errors(schema_file: str, instance: Any) -> list[str]:
    return [e.message for e in validator(schema_file).iter_errors(instance)]


def picker_config() -> dict[str, Any]:
    """epp-config.yaml as the picker reads it: from the ConfigMap its Deployment mounts."""
    (volume,) = (v for v in picker_pod()["volumes"] if v["name"] == "config")
    data = named(render(BUILD), "ConfigMap", volume["configMap"]["name"])["data"]
    return yaml.safe_load(data["epp-config.yaml"])


def picker() -> Obj:
    return named(render(BUILD), "Deployment", "model-serving-epp")


def picker_pod() -> dict[str, Any]:
    return picker()["spec"]["template"]["spec"]


def args_of(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


def test_every_gateway_resource_validates_against_its_apis_schema():
    custom = [obj for obj in render(BUILD) if obj["apiVersion"].startswith(GATEWAY_GROUPS)]
    assert sorted(obj["kind"] for obj in custom) == ["Gateway", "HTTPRoute", "InferencePool"]
    for obj in custom:
        assert errors(SCHEMA_OF_KIND[obj["kind"]], obj) == [], obj["kind"]


def test_picker_config_validates_and_every_reference_names_a_plugin():
    config = picker_config()
    assert errors(CONFIG_SCHEMA, config) == []
    names = {plugin.get("name") or plugin["type"] for plugin in config["plugins"]}
    refs = [p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]]
    refs.append(config["saturationDetector"]["pluginRef"])
    for source in config["dataLayer"]["sources"]:
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    assert set(refs) <= names
    types = {plugin["type"] for plugin in config["plugins"]}
    assert {"prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= types


def mutated(obj: Obj, path: tuple[Any, ...], value: Any) -> Obj:
    """A deep copy with obj[path] set to value (None deletes it)."""
    copied = copy.deepcopy(obj)
    target = copied
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copied


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("InferencePool", ("spec", "targetPorts"), None),
        ("InferencePool", ("spec", "targetPorts"), [{"number": 8000}, {"number": 8000}]),
        ("InferencePool", ("spec", "endpointPickerRef", "port"), None),
        ("InferencePool", ("spec", "endpointPickerRef", "failureMode"), "FailSometimes"),
        ("InferencePool", ("spec", "selector", "matchLabels"), {}),
        ("InferencePool", ("spec", "replicas"), 2),
        ("HTTPRoute", ("spec", "rules", 0, "matches", 0, "path", "value"), "v1"),
        ("HTTPRoute", ("spec", "rules", 0, "matches", 0, "path", "value"), "/v1//x"),
        ("HTTPRoute", ("spec", "rules", 0, "timeouts", "request"), "5 minutes"),
        ("HTTPRoute", ("spec", "rules", 1, "backendRefs", 0, "port"), None),
        ("Gateway", ("spec", "listeners"), []),
        ("Gateway", ("spec", "listeners", 0, "port"), 70000),
    ],
)
def test_schemas_refuse_what_the_api_server_refuses(kind, path, value):
    (obj,) = of_kind(render(BUILD), kind)
    assert errors(SCHEMA_OF_KIND[kind], obj) == []
    assert errors(SCHEMA_OF_KIND[kind], mutated(obj, path, value)) != []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schedulingProfile",), []),  # a misspelt field: the picker decodes strictly
        (("plugins", 0, "type"), "prefix-cache-scorer-v2"),
        (("plugins", 1, "parameters", "engineConfigs", 0, "kvUsageSpec"), "vllm kv usage"),
        (("plugins", -1, "parameters", "kvCacheUtilThreshold"), 1.5),
        (("schedulingProfiles",), None),
    ],
)
def test_picker_config_schema_refuses_what_the_picker_refuses(path, value):
    assert errors(CONFIG_SCHEMA, mutated(picker_config(), path, value)) != []


def test_pool_selects_the_stable_server_pods_on_their_http_port():
    objects = render(BUILD)
    (pool,) = of_kind(objects, "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels) is (deployment["metadata"]["name"] == "model-serving")
    server = named(objects, "Deployment", "model-serving")["spec"]["template"]["spec"]
    (http,) = server["containers"][0]["ports"]
    assert pool["spec"]["targetPorts"] == [{"number": http["containerPort"]}]


def test_pool_names_the_pickers_service_and_its_ext_proc_port():
    objects = render(BUILD)
    ref = named(objects, "InferencePool", "model-serving")["spec"]["endpointPickerRef"]
    service = named(objects, "Service", ref["name"])
    assert selects(service["spec"]["selector"], picker()["spec"]["template"]["metadata"]["labels"])
    (port,) = (p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    (container,) = picker_pod()["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == 9002  # the picker's ext-proc port


def test_picker_runs_the_pinned_image_on_its_pool_with_the_mounted_config():
    pod = picker_pod()
    (container,) = pod["containers"]
    assert container["image"] == EPP_IMAGE
    args = args_of(container)
    assert (
        args["pool-name"]
        == named(render(BUILD), "InferencePool", "model-serving")["metadata"]["name"]
    )
    assert args["pool-group"] == "inference.networking.k8s.io"
    env = {e["name"]: e for e in container["env"]}
    assert env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args["config-file"] == f"{mounts['config']}/epp-config.yaml"
    assert picker()["spec"]["replicas"] == 1  # its prefix index lives in its memory
    # Numbers older than the staleness limit make a pod count as full: the limit must outlast
    # the scrape interval.
    (detector,) = (p for p in picker_config()["plugins"] if p["type"] == "utilization-detector")
    stale_s = seconds(detector["parameters"]["metricsStalenessThreshold"])
    assert stale_s >= 2 * seconds(args["refresh-metrics-interval"])


def seconds(duration: str) -> float:
    """A Go duration of one unit, as these manifests write them ("100ms", "2s")."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", duration).groups()  # type: ignore[union-attr]
    return float(number) / (1000 if unit == "ms" else 1)


def test_picker_may_read_its_pool_and_the_pools_pods_and_nothing_cluster_wide():
    objects = render(BUILD)
    account = picker_pod()["serviceAccountName"]
    named(objects, "ServiceAccount", account)
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    (binding,) = of_kind(objects, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "model-serving"}
    ]
    role = named(objects, "Role", binding["roleRef"]["name"])
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for verb in ("get", "list", "watch"):
        assert ("", "pods", verb) in granted
        assert ("inference.networking.k8s.io", "inferencepools", verb) in granted
    assert not any(verb in {"create", "update", "patch", "delete"} for _, _, verb in granted)


def test_route_sends_v1_to_the_pool_and_predict_stays_on_the_plain_service():
    objects = render(BUILD)
    (route,) = of_kind(objects, "HTTPRoute")
    for parent in route["spec"]["parentRefs"]:
        named(objects, "Gateway", parent["name"])
    by_path = {
        (match["path"]["type"], match["path"]["value"]): rule["backendRefs"]
        for rule in route["spec"]["rules"]
        for match in rule["matches"]
    }
    (pool_ref,) = by_path[("PathPrefix", "/v1")]
    assert (pool_ref["group"], pool_ref["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    named(objects, "InferencePool", pool_ref["name"])
    for path in ("/v1/models", "/v1/embeddings"):  # no generation: no cache to aim at
        (service_ref,) = by_path[("Exact", path)]
        service = named(objects, "Service", service_ref["name"])
        assert service_ref["port"] in {p["port"] for p in service["spec"]["ports"]}
    # The Ingress keeps the rest of the API on the plain Service and no longer serves /v1.
    ingress_paths = {
        path["path"]: path["backend"]["service"]["name"]
        for ingress in of_kind(objects, "Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert ingress_paths["/predict"] == ingress_paths["/generate"] == "model-serving"
    assert not any(path.startswith("/v1") for path in ingress_paths)


def selector_name(spec: str) -> str:
    return spec.split("{")[0]


def test_keda_scales_the_pool_below_the_pickers_own_limits():
    objects = render(BUILD)
    (scaled,) = of_kind(objects, "ScaledObject")
    target = named(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in target["spec"]  # KEDA owns the count
    pool = named(objects, "InferencePool", "model-serving")
    assert selects(
        pool["spec"]["selector"]["matchLabels"], target["spec"]["template"]["metadata"]["labels"]
    )
    thresholds = {}
    for trigger in scaled["spec"]["triggers"]:
        (series,) = re.findall(r"(vllm:[a-z_]+)\{", trigger["metadata"]["query"])
        assert 'role="stable"' in trigger["metadata"]["query"]
        thresholds[series] = float(trigger["metadata"]["threshold"])
    (detector,) = (p for p in picker_config()["plugins"] if p["type"] == "utilization-detector")
    limits = detector["parameters"]
    assert 0 < thresholds["vllm:num_requests_waiting"] < limits["queueDepthThreshold"]
    assert 0 < thresholds["vllm:kv_cache_usage_perc"] < limits["kvCacheUtilThreshold"]


def test_pods_behind_the_gateway_take_the_client_from_the_hop_the_gateway_appended():
    """The Gateway's proxy appends to X-Forwarded-For; trusting every entry (the base's `*`
    alone) would let a client name itself. The overlay trusts one hop, and its settings parse."""
    objects = render(BUILD)
    settings = settings_of(objects, named(objects, "Deployment", "model-serving"))
    assert settings["FORWARDED_TRUSTED_HOPS"] == "1"
    parsed = Settings(
        forwarded_allow_ips=settings["FORWARDED_ALLOW_IPS"],
        forwarded_trusted_hops=settings["FORWARDED_TRUSTED_HOPS"],  # type: ignore[arg-type]
    )
    assert parsed.forwarded_trusted_hops == 1
