"""The manifests in manifests/: they parse, use the kinds and API versions they should, match the
Kubernetes object shapes field by field, ask for no more RBAC than the EPP uses, give the EPP flags
`epp serve` accepts, and the InferencePool validates against the CRD we ship."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import models as k8s_models

from extproc.cli.main import _kubernetes_options, _peer_options, build_parser
from pickers.config.loader import load_config_file
from tests.k8s.kustomize import needs_kubectl, render

ROOT = Path(__file__).resolve().parents[2] / "manifests"
# The Helm chart's templates are not manifests until rendered: tests/unit/test_helm_chart.py checks them.
FILES = sorted(p for p in ROOT.rglob("*.yaml") if not p.is_relative_to(ROOT / "charts"))

KINDS = {
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "Gateway": "gateway.networking.k8s.io/v1",
    "GatewayClass": "gateway.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "DestinationRule": "networking.istio.io/v1",
    "BackendTrafficPolicy": "gateway.envoyproxy.io/v1alpha1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
    "EndpointPickerConfig": "llm-d.ai/v1alpha1",
    "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
}
# Core kinds checked against the client's models: every field must be one the API knows.
MODELS = {
    "CustomResourceDefinition": "V1CustomResourceDefinition",
    "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
}
# What the EPP does with the API, and nothing more (the RBAC the InferencePool guides grant).
ALLOWED_RBAC = {
    ("", "pods"): {"get", "list", "watch"},
    ("inference.networking.k8s.io", "inferencepools"): {"get", "list", "watch"},
    ("inference.networking.x-k8s.io", "inferenceobjectives"): {"get", "list", "watch"},
    ("inference.networking.x-k8s.io", "inferencemodelrewrites"): {"get", "list", "watch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    ("", "events"): {"create"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},  # components/active-active: peer discovery
}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in FILES for d in docs(p)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in all_docs() if d.get("kind") == kind]


def test_there_are_manifests() -> None:
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_document_has_a_known_kind_and_api_version(path: Path) -> None:
    for doc in docs(path):
        assert doc.get("kind") in KINDS, f"{path}: unexpected kind {doc.get('kind')}"
        assert doc["apiVersion"] == KINDS[doc["kind"]], path
        if doc["kind"] not in ("Kustomization", "Component", "EndpointPickerConfig"):
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), path


def _check_shape(value: Any, type_name: str, where: str) -> None:
    if value is None:
        return
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            _check_shape(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        inner = type_name[5:-1].split(", ", 1)[1]
        for k, v in value.items():
            _check_shape(v, inner, f"{where}.{k}")
        return
    model = getattr(k8s_models, type_name, None)
    if model is None:
        return  # a primitive or free-form object
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping, got {value!r}"
    by_json = {json: attr for attr, json in model.attribute_map.items()}
    for key, item in value.items():
        assert key in by_json, f"{where}: {type_name} has no field {key!r}"
        _check_shape(item, model.openapi_types[by_json[key]], f"{where}.{key}")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_core_objects_have_only_fields_the_api_knows(kind: str) -> None:
    found = [(p, d) for p, d in all_docs() if d.get("kind") == kind]
    assert found, kind
    for path, doc in found:
        _check_shape(doc, MODELS[kind], f"{path.relative_to(ROOT)}:{kind}")


def test_rbac_is_no_wider_than_the_epp_needs() -> None:
    (role,) = of_kind("Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule or rule["resourceNames"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"]
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in granted.items():
        assert key in ALLOWED_RBAC, f"RBAC grants {key} which the EPP does not use"
        assert verbs <= ALLOWED_RBAC[key], f"{key}: {sorted(verbs - ALLOWED_RBAC[key])} not needed"
    assert granted[("", "pods")] == {"get", "list", "watch"}
    assert granted[("coordination.k8s.io", "leases")] == {"get", "create", "update"}
    # what extproc.kubernetes.objective_watches watches, in the group its CRDs declare
    from extproc.kubernetes.objective_watches import OBJECTIVES_GROUP, OBJECTIVES_PLURAL, REWRITES_PLURAL

    crd_groups = {d["spec"]["names"]["plural"]: d["spec"]["group"] for d in of_kind("CustomResourceDefinition")}
    for plural in (OBJECTIVES_PLURAL, REWRITES_PLURAL):
        assert crd_groups[plural] == OBJECTIVES_GROUP
        assert {"list", "watch"} <= granted[(OBJECTIVES_GROUP, plural)]
    assert not of_kind("ClusterRole") and not of_kind("ClusterRoleBinding")
    (binding,) = of_kind("RoleBinding")
    (account,) = of_kind("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]


def _epp_container() -> dict[str, Any]:
    (deploy,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "llm-pool-epp"]
    return deploy["spec"]["template"]["spec"]["containers"][0]


def test_the_epp_deployment_args_are_flags_epp_serve_accepts() -> None:
    container = _epp_container()
    assert container["command"] == ["epp"]
    args = build_parser().parse_args(container["args"])
    opts = _kubernetes_options(args)
    assert args.command == "serve" and opts is not None and opts.pool_name == "llm-pool"
    ha = docs(ROOT / "components/ha/kustomization.yaml")[0]
    extra = [op["value"] for p in ha["patches"] for op in yaml.safe_load(p["patch"]) if op["path"].endswith("/args/-")]
    ha_opts = _kubernetes_options(build_parser().parse_args(container["args"] + extra))
    assert ha_opts is not None and ha_opts.leader_election


def test_the_epp_probes_and_ports_match_its_flags() -> None:
    container = _epp_container()
    args = build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.grpc_port, "grpc-health": args.grpc_health_port, "metrics": args.metrics_port}
    assert container["readinessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "liveness"}
    env = {e["name"] for e in container["env"]}
    assert {"NAMESPACE", "POD_NAME"} <= env


def test_the_shipped_config_loads() -> None:
    load_config_file(ROOT / "epp/config.yaml")


def test_the_shipped_config_is_the_built_in_default_strategy() -> None:
    """`epp serve` without a config runs `best`; the manifests' ConfigMap carries the same config
    (kustomize cannot load pickers/configs/best.yaml from outside its root, so this keeps the copy equal)."""
    from pickers.config.strategies import DEFAULT_STRATEGY, strategy_config

    assert yaml.safe_load((ROOT / "epp/config.yaml").read_text()) == yaml.safe_load(strategy_config(DEFAULT_STRATEGY))


def _base_pool() -> dict[str, Any]:
    (pool,) = docs(ROOT / "inferencepool.yaml")
    return pool


def test_pool_service_routes_and_model_servers_fit_together() -> None:
    pool = _base_pool()
    (service,) = docs(ROOT / "epp/service.yaml")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= _deployment("llm-pool-epp")["spec"]["template"]["metadata"]["labels"].items()
    selector = pool["spec"]["selector"]["matchLabels"]
    ports = {p["number"] for p in pool["spec"]["targetPorts"]}
    model_servers = [d for d in of_kind("Deployment") if d["metadata"]["name"].startswith("vllm-")]
    assert len(model_servers) == 3
    for d in model_servers:
        template = d["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items(), d["metadata"]["name"]
        served = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports <= served, d["metadata"]["name"]
    routes = of_kind("HTTPRoute")
    assert len(routes) == len(GATEWAYS)
    for route in routes:
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}


GATEWAYS = {"istio": "istio", "kgateway": "kgateway", "envoy-gateway": "envoy-gateway", "agentgateway": "agentgateway",
            "nginx-gateway-fabric": "nginx"}  # folder -> gatewayClassName


def test_each_gateway_overlay_names_its_gateway_class() -> None:
    for gw, cls in GATEWAYS.items():
        (gateway,) = [d for p in sorted((ROOT / "gateways" / gw).glob("*.yaml")) for d in docs(p) if d["kind"] == "Gateway"]
        assert gateway["spec"]["gatewayClassName"] == cls, gw


def _active_active_patch() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    k = docs(ROOT / "components/active-active/kustomization.yaml")[0]
    by_kind = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in k["patches"]}
    return by_kind["Deployment"], by_kind["Role"]


def test_the_active_active_component_gives_epp_serve_flags_it_accepts() -> None:
    container = _epp_container()
    deployment_ops, _ = _active_active_patch()
    extra = [op["value"] for op in deployment_ops if op["path"].endswith("/args/-")]
    args = build_parser().parse_args(container["args"] + extra)
    peers = _peer_options(args)
    (svc,) = docs(ROOT / "components/active-active/peers-service.yaml")
    assert peers is not None and peers.service == svc["metadata"]["name"]
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "peers" and port["port"] == peers.port  # the name discovery looks for
    assert svc["spec"]["clusterIP"] == "None"  # headless: its EndpointSlices list every replica
    assert svc["spec"]["selector"].items() <= _deployment("llm-pool-epp")["spec"]["template"]["metadata"]["labels"].items()
    (added,) = [op["value"] for op in deployment_ops if op["path"].endswith("/ports/-")]
    assert added == {"name": "peers", "containerPort": peers.port}
    assert args.shutdown_delay > 0  # a draining replica keeps serving while the gateways stop sending


def test_the_active_active_component_grants_only_endpointslice_reads() -> None:
    _, role_ops = _active_active_patch()
    (op,) = role_ops
    assert op["value"] == {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    for group in op["value"]["apiGroups"]:
        for resource in op["value"]["resources"]:
            assert set(op["value"]["verbs"]) <= ALLOWED_RBAC[(group, resource)]


@needs_kubectl
def test_the_base_with_active_active_renders_two_replicas_that_roll_one_at_a_time() -> None:
    objects = render(ROOT, components=("components/active-active",), tree=ROOT)
    deploy = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-pool-epp"][0]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]} in role["rules"]
    (pdb,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Service"} >= {"llm-pool-epp", "llm-pool-epp-peers"}
    for o in objects:
        if o["kind"] in MODELS:
            _check_shape(o, MODELS[o["kind"]], f"active-active:{o['kind']}")


def _deployment(name: str) -> dict[str, Any]:
    (d,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == name]
    return d


def test_each_gateway_overlay_has_a_gateway_and_route_and_stands_alone() -> None:
    """A gateway overlay is applied beside the base (or manifests/wide-ep): kustomize refuses one that
    includes the base whose folder holds it ("cycle detected")."""
    for gw in GATEWAYS:
        k = docs(ROOT / "gateways" / gw / "kustomization.yaml")[0]
        assert all(not r.startswith("..") for r in k["resources"]), gw
        kinds = {d["kind"] for r in k["resources"] for d in docs(ROOT / "gateways" / gw / r)}
        assert {"Gateway", "HTTPRoute"} <= kinds, gw
    (rule,) = of_kind("DestinationRule")
    assert rule["spec"]["host"] == "llm-pool-epp" and rule["spec"]["trafficPolicy"]["tls"]["mode"] == "DISABLE"


KUSTOMIZATIONS = sorted(p.parent for p in FILES if p.name == "kustomization.yaml" and docs(p)[0]["kind"] == "Kustomization")


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)) or ".")
def test_every_kustomization_renders(path: Path) -> None:
    """`kubectl kustomize` (kubectl apply -k) builds each one; every object it makes is of a kind we ship."""
    for obj in render(path):
        assert KINDS.get(obj["kind"], "v1" if obj["kind"] == "ConfigMap" else None) == obj["apiVersion"], (path, obj["kind"])


@needs_kubectl
def test_the_base_renders_the_epp_its_config_and_one_pool() -> None:
    objects = render(ROOT)
    (pool,) = [o for o in objects if o["kind"] == "InferencePool"]
    assert pool == _base_pool()
    (deploy,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-pool-epp"]
    (volume,) = deploy["spec"]["template"]["spec"]["volumes"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]]
    assert cm["data"]["config.yaml"] == (ROOT / "epp/config.yaml").read_text()


@pytest.mark.parametrize("path", sorted(p for p in FILES if p.name == "kustomization.yaml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomizations_name_files_that_exist(path: Path) -> None:
    k = docs(path)[0]
    for res in k.get("resources", []):
        assert (path.parent / res).exists(), f"{path}: {res}"
    for gen in k.get("configMapGenerator", []):
        for f in gen.get("files", []):
            assert (path.parent / f.split("=", 1)[-1]).exists(), f"{path}: {f}"


# -- the InferencePool against the CRD's openAPI schema ---------------------------------------------


def validate(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """A small structural openAPI v3 check: types, required, enums, bounds, unknown fields."""
    errors: list[str] = []
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}
    if t and not isinstance(value, types[t]) or (t == "integer" and isinstance(value, bool)):
        return [f"{where}: expected {t}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    for key, check in (("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b)):
        if key in schema and not check(value, schema[key]):
            errors.append(f"{where}: {value} breaks {key} {schema[key]}")
    for key, check in (("minLength", lambda v, b: len(v) >= b), ("maxLength", lambda v, b: len(v) <= b),
                       ("minItems", lambda v, b: len(v) >= b), ("maxItems", lambda v, b: len(v) <= b),
                       ("minProperties", lambda v, b: len(v) >= b), ("maxProperties", lambda v, b: len(v) <= b)):  # fmt: skip
        if key in schema and not check(value, schema[key]):
            errors.append(f"{where}: breaks {key} {schema[key]}")
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{where}: missing {req}")
        for k, v in value.items():
            if props is not None and k in props:
                errors += validate(v, props[k], f"{where}.{k}")
            elif "additionalProperties" in schema:
                errors += validate(v, schema["additionalProperties"], f"{where}.{k}")
            elif props is not None:
                errors.append(f"{where}: unknown field {k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    return errors


def _pool_schema() -> dict[str, Any]:
    (crd,) = [d for d in of_kind("CustomResourceDefinition") if d["spec"]["names"]["kind"] == "InferencePool"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", sorted(p for p in FILES if p.name == "inferencepool.yaml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_inference_pools_validate_against_the_crd_schema(path: Path) -> None:
    (pool,) = docs(path)
    assert validate(pool, _pool_schema()) == []


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda s: s.pop("selector"), "missing selector"),
        (lambda s: s.update(targetPorts=[{"number": 70000}]), "maximum"),
        (lambda s: s.update(targetPorts=[{"number": p} for p in range(8000, 8009)]), "maxItems"),
        (lambda s: s["endpointPickerRef"].update(failureMode="Sometimes"), "not in"),
        (lambda s: s.update(selectr={}), "unknown field selectr"),
    ],
)  # fmt: skip
def test_the_schema_check_catches_broken_pools(mutate, problem: str) -> None:
    pool = _base_pool()
    mutate(pool["spec"])
    assert any(problem in e for e in validate(pool, _pool_schema()))
