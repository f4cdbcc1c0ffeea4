"""The Helm chart (manifests/charts/llm-epp), rendered and linted offline with Helm v4 as a library
(helm-python-sdk): for every provider and every sample values file (GIE inferencepool and llm-d router
shapes, under the chart's examples/), the objects are checked as the kustomize manifests are (kinds,
field shapes, the CRD schemas, flags `epp serve` parses, configs the loader loads, least-privilege
RBAC); keys it cannot honour are refused with the key and the reason; and the kustomize base and the
chart render the same core objects."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli.main import _kubernetes_options, _peer_options, build_parser
from pickers.config.loader import load_config_file
from pickers.config.strategies import DEFAULT_STRATEGY, strategy_config
from tests.k8s.kustomize import needs_kubectl, render as kustomize
from tests.k8s.test_manifests import ALLOWED_RBAC, KINDS, MODELS, _check_shape, validate

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) is not installed")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "manifests" / "charts" / "llm-epp"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRDS = REPO / "manifests" / "crds"
PROVIDERS = ("none", "istio", "kgateway", "agentgateway", "envoy-gateway", "nginx-gateway-fabric")
# What the chart may render beyond the kustomize tree's kinds.
CHART_KINDS = {**KINDS, "ConfigMap": "v1", "ServiceMonitor": "monitoring.coreos.com/v1",
               "InferenceObjective": "inference.networking.x-k8s.io/v1alpha2"}  # fmt: skip
POOL = {"inferencePool": {"modelServers": {"matchLabels": {"app": "vllm-llama"}}}}
# active-active replicas: more than one, leader election off
ACTIVE_ACTIVE = {"replicas": 2, "flags": {"ha-enable-leader-election": False}}
CONFIG = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"


@pytest.fixture(scope="module")
def chart():  # type: ignore[no-untyped-def]
    with helm.Chart.load(CHART) as c:
        yield c


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def render(chart, values: dict[str, Any], name: str = "llm-pool", namespace: str = "llm") -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    out = chart.render(values=values, name=name, namespace=namespace)
    return [d for path, text in sorted(out.items()) if not path.endswith(".txt") for d in yaml.safe_load_all(text) if d]


def refusal(chart, values: dict[str, Any]) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(helm.HelmRenderError) as e:
        chart.render(values=values, name="llm-pool", namespace="llm")
    return str(e.value)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def _epp(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _schema(kind: str) -> dict[str, Any]:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(kind)


def _example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# -- the flag table against the CLI --------------------------------------------------------------


def _template_table(define: str) -> dict[str, str]:
    text = (CHART / "templates" / "_flags.tpl").read_text()
    body = re.search(r'\{\{- define "' + re.escape(define) + r'" -\}\}\n(.*?)\{\{- end -\}\}', text, re.S)
    assert body, define
    return yaml.safe_load(body.group(1))


def test_the_charts_flag_table_is_the_cli_parsers() -> None:
    """Every flag `epp serve` has is in the chart's table, written the way the parser reads it."""
    import argparse

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    parser_flags = {}
    for action in serve._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                kind = "switch" if isinstance(action, argparse._StoreTrueAction) else "bool" if action.nargs == "?" else "value"
                parser_flags[opt[2:]] = kind
    assert _template_table("llm-epp.serveFlags") == parser_flags
    for table in ("llm-epp.reservedFlags", "llm-epp.foreignFlags"):
        assert set(_template_table(table)) <= set(parser_flags) | set(_template_table("llm-epp.foreignFlags")), table
    assert not set(_template_table("llm-epp.foreignFlags")) & set(parser_flags)


# -- lint ---------------------------------------------------------------------------------------


def _provider_values(provider: str) -> dict[str, Any]:
    values = _merge(POOL, {"provider": {"name": provider}, "experimentalHttpRoute": {"enabled": True}, "gateway": {"create": True}})
    if provider == "none":
        values["gateway"]["className"] = "my-gateway-class"
    return values


@pytest.mark.parametrize(
    "values", [None, *EXAMPLES, *PROVIDERS],
    ids=lambda v: v.name if isinstance(v, Path) else f"provider-{v}" if v else "values.yaml",
)  # fmt: skip
def test_the_chart_lints_clean(values: Path | str | None) -> None:
    """`helm lint --strict`, with the chart's own values, each example and each provider. (Lint runs
    templates leniently: `fail` only logs there, so refusals are tested by rendering, below.)"""
    given = _example(values) if isinstance(values, Path) else _provider_values(values) if values else None
    report = helm.lint(CHART, given, strict=True, namespace="llm")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# -- what every rendering must satisfy ---------------------------------------------------------


def check_objects(objects: list[dict[str, Any]], namespace: str = "llm") -> None:
    """The checks tests/k8s/test_manifests.py makes on the kustomize tree, on one rendering."""
    for o in objects:
        assert CHART_KINDS.get(o["kind"]) == o["apiVersion"], (o["kind"], o["apiVersion"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", o["metadata"]["name"]), o["metadata"]["name"]
        if o["kind"] not in ("GatewayClass",):
            assert o["metadata"].get("namespace") == namespace or o["kind"] == "Gateway", o["kind"]
        if o["kind"] in MODELS:
            _check_shape(o, MODELS[o["kind"]], f"{o['kind']}/{o['metadata']['name']}")
    assert not kinds(objects) & {"ClusterRole", "ClusterRoleBinding"}
    for o in objects:
        if o["kind"] in ("InferencePool", "InferenceObjective"):
            assert validate(o, _schema(o["kind"])) == [], o

    # RBAC: no more than the EPP uses, bound to its account
    role = one(objects, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"]
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in granted.items():
        assert key in ALLOWED_RBAC and verbs <= ALLOWED_RBAC[key], key
    binding, account = one(objects, "RoleBinding"), one(objects, "ServiceAccount")
    deploy = one(objects, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}]
    assert pod["serviceAccountName"] == account["metadata"]["name"]

    # the EPP's flags parse, and its probes, ports and Service follow them
    container = _epp(objects)
    assert container["command"] == ["epp"]
    args = build_parser().parse_args(container["args"])
    opts = _kubernetes_options(args)
    assert args.command == "serve" and opts is not None
    assert ("", "pods") in granted
    if opts.pool_name:
        assert ("inference.networking.k8s.io", "inferencepools") in granted
    if opts.leader_election:
        assert granted[("coordination.k8s.io", "leases")] == {"get", "create", "update"}
    else:
        assert ("coordination.k8s.io", "leases") not in granted
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # active-active replicas that share: the headless Service they find each other by, and only then
    # the EndpointSlice permission and the peers port
    assert not args.peers and not (args.peer_service and opts.leader_election)
    if args.peer_service:
        peers = one(objects, "Service", args.peer_service)
        assert peers["spec"]["clusterIP"] == "None"
        assert peers["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        assert [(p["name"], p["port"], p["targetPort"]) for p in peers["spec"]["ports"]] == [("peers", args.peer_port, args.peer_port)]
        assert ports["peers"] == args.peer_port
        assert granted[("discovery.k8s.io", "endpointslices")] == {"get", "list", "watch"}
    else:
        assert ("discovery.k8s.io", "endpointslices") not in granted and "peers" not in ports
        assert [s["metadata"]["name"] for s in objects if s["kind"] == "Service"] == [deploy["metadata"]["name"]]
    active_active = deploy["spec"]["replicas"] > 1 and not opts.leader_election
    assert ("PodDisruptionBudget" in kinds(objects)) == active_active
    if active_active:
        assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        assert args.shutdown_delay > 0
        pdb = one(objects, "PodDisruptionBudget")
        assert pdb["spec"] == {"minAvailable": 1, "selector": deploy["spec"]["selector"]}
    elif opts.leader_election:
        assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert (ports["grpc"], ports["grpc-health"], ports["metrics"]) == (args.grpc_port, args.grpc_health_port, args.metrics_port)
    assert container["readinessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": args.grpc_health_port, "service": "liveness"}
    assert {"NAMESPACE", "POD_NAME"} <= {e["name"] for e in container["env"]}
    service = one(objects, "Service", deploy["metadata"]["name"])
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    ext_proc = [p for p in service["spec"]["ports"] if p["name"] == "grpc-ext-proc"][0]
    assert ext_proc["port"] == ext_proc["targetPort"] == args.grpc_port
    assert (ext_proc.get("appProtocol") == "kubernetes.io/h2c") == (not args.secure_serving)

    # the config the EPP loads is in its ConfigMap, and every file there loads
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    cm = one(objects, "ConfigMap", volume["configMap"]["name"])
    assert args.config_file.startswith("/config/") and args.config_file.removeprefix("/config/") in cm["data"]
    for text in cm["data"].values():
        load_config_file_text(text)

    if opts.pool_name:
        pool = one(objects, "InferencePool", opts.pool_name)
        ref = pool["spec"]["endpointPickerRef"]
        assert ref["name"] == service["metadata"]["name"] and ref["port"]["number"] == ext_proc["port"]
    else:
        assert "InferencePool" not in kinds(objects) and "HTTPRoute" not in kinds(objects)
    for route in [o for o in objects if o["kind"] == "HTTPRoute"]:
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": opts.pool_name}


def load_config_file_text(text: str) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        load_config_file(Path(f.name))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_renders_objects_that_pass_the_manifest_checks(chart, path: Path) -> None:  # type: ignore[no-untyped-def]
    check_objects(render(chart, _example(path)))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_renders_its_objects(chart, provider: str) -> None:  # type: ignore[no-untyped-def]
    objects = render(chart, _provider_values(provider))
    check_objects(objects)
    gateway = one(objects, "Gateway", "inference-gateway")
    classes = {"none": "my-gateway-class", "istio": "istio", "kgateway": "kgateway", "agentgateway": "agentgateway",
               "envoy-gateway": "envoy-gateway", "nginx-gateway-fabric": "nginx"}  # fmt: skip
    assert gateway["spec"]["gatewayClassName"] == classes[provider]
    route = one(objects, "HTTPRoute", "llm-pool")
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "300s"}
    assert ("DestinationRule" in kinds(objects)) == (provider == "istio")
    assert ("BackendTrafficPolicy" in kinds(objects)) == (provider == "envoy-gateway")
    assert ("GatewayClass" in kinds(objects)) == (provider == "envoy-gateway")
    # NGINX Gateway Fabric calls the EPP over TLS (unless run with --endpoint-picker-disable-tls)
    args = build_parser().parse_args(_epp(objects)["args"])
    assert args.secure_serving == (provider == "nginx-gateway-fabric")


def test_istio_turns_tls_off_towards_a_plaintext_epp_and_on_towards_a_tls_one(chart) -> None:  # type: ignore[no-untyped-def]
    rule = one(render(chart, _merge(POOL, {"provider": {"name": "istio"}})), "DestinationRule")
    assert rule["spec"]["host"] == "llm-pool-epp.llm.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "DISABLE"}
    values = _merge(POOL, {"provider": {"name": "istio", "istio": {"destinationRule": {"host": "epp.example", "trafficPolicy": {
        "connectionPool": {"http": {"maxRequestsPerConnection": 256000}}}}}}, "inferenceExtension": {"flags": {"secure-serving": True}}})  # fmt: skip
    objects = render(chart, values)
    rule = one(objects, "DestinationRule")
    assert rule["spec"] == {"host": "epp.example", "trafficPolicy": {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True},
                            "connectionPool": {"http": {"maxRequestsPerConnection": 256000}}}}  # fmt: skip
    check_objects(objects)


def test_all_epp_config_files_pass_epp_check_config(chart, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`epp check-config` (the CLI users run) accepts every config file any example renders."""
    files = []
    for path in EXAMPLES:
        for o in render(chart, _example(path)):
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "llm-pool-epp":
                for name, text in o["data"].items():
                    f = tmp_path / f"{path.stem}-{name}"
                    f.write_text(text)
                    files.append(str(f))
    assert len(files) == len(EXAMPLES) + 3  # every default-plugins.yaml and the three custom configs
    result = subprocess.run([sys.executable, "-m", "extproc.cli", "check-config", *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the values, key by key --------------------------------------------------------------------


def test_the_default_config_is_the_built_in_default_and_follows_the_model_server_values(chart) -> None:  # type: ignore[no-untyped-def]
    def config(extra: dict[str, Any]) -> dict[str, Any]:
        cm = one(render(chart, _merge(POOL, extra)), "ConfigMap", "llm-pool-epp")
        return yaml.safe_load(cm["data"]["default-plugins.yaml"])

    default = config({})
    assert default == yaml.safe_load(strategy_config(DEFAULT_STRATEGY))  # what `epp serve` runs without a config
    typed = config({"inferencePool": {"modelServerType": "sglang", "parser": "openai-parser"},
                    "inferenceExtension": {"metricsDataSource": {"scheme": "https", "path": "/m"}}})  # fmt: skip
    by_type = {p["type"]: p.get("parameters") for p in typed["plugins"]}
    assert by_type["core-metrics-extractor"] == {"defaultEngine": "sglang"}
    assert by_type["metrics-data-source"] == {"scheme": "https", "path": "/m", "insecureSkipVerify": True}
    assert typed["requestHandler"] == {"parsers": [{"pluginRef": "openai-parser"}]}
    triton = config({"router": {"modelServers": {"type": "triton"}}})
    assert triton["requestHandler"] == {"parsers": [{"pluginRef": "passthrough-parser"}]}
    llmd_https = config({"router": {"epp": {"metricsDataSource": {"scheme": "https", "insecureSkipVerify": False}}}})
    assert {p["type"]: p.get("parameters") for p in llmd_https["plugins"]}["metrics-data-source"] == {
        "scheme": "https", "path": "/metrics", "insecureSkipVerify": False}  # fmt: skip
    latency = config({"inferenceExtension": {"latencyPredictor": {"enabled": True}}})
    assert latency["schedulingProfiles"][0]["plugins"][0] == {"pluginRef": "predicted-latency-producer"}
    assert [p["type"] for p in latency["plugins"]][:3] == ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({}, ["--log-format=json"]),  # GIE's chart runs its EPP with --zap-encoder json
        ({"zap-encoder": "console"}, []),
        ({"v": 2}, ["--log-format=json"]),  # GIE's default level: llm-epp's info
        ({"v": 4}, ["--log-format=json", "--v=1"]),  # GIE's debug: llm-epp's debug
        ({"log-format": "text", "explain-scores": True, "log-requests": False}, ["--explain-scores"]),
        ({"log-format": "text", "metrics-endpoint-auth": False, "max-body-bytes": 20000000}, ["--max-body-bytes=20000000"]),
        ({"log-format": "text", "grace-period": 30, "allow-experimental-plugins": True}, ["--allow-experimental-plugins=true"]),
    ],
)  # fmt: skip
def test_flags_are_translated_to_epp_serve_flags(chart, flags: dict[str, Any], expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    args = _epp(render(chart, _merge(POOL, {"inferenceExtension": {"flags": flags}})))["args"]
    fixed = ["serve", "--pool-name=llm-pool", "--config-file=/config/default-plugins.yaml", "--grpc-port=9002",
             "--grpc-health-port=9003", "--metrics-port=9090", f"--grace-period={flags.get('grace-period', 120)}"]  # fmt: skip
    assert args == fixed + expected
    build_parser().parse_args(args)


def test_replicas_and_leader_election(chart) -> None:  # type: ignore[no-untyped-def]
    one_replica = render(chart, POOL)
    assert one(one_replica, "Deployment")["spec"]["replicas"] == 1 and "strategy" not in one(one_replica, "Deployment")["spec"]
    active_passive = render(chart, _merge(POOL, {"inferenceExtension": {"replicas": 3}}))
    deploy = one(active_passive, "Deployment")
    assert deploy["spec"]["replicas"] == 3 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert _kubernetes_options(build_parser().parse_args(_epp(active_passive)["args"])).leader_election
    active_active = render(chart, _merge(POOL, {"inferenceExtension": {"replicas": 3, "flags": {"ha-enable-leader-election": False}}}))
    assert not _kubernetes_options(build_parser().parse_args(_epp(active_active)["args"])).leader_election
    for objects in (one_replica, active_passive, active_active):
        check_objects(objects)
    # least privilege: only replicas that share read EndpointSlices, and only they get a peers Service
    for objects in (one_replica, active_passive):
        assert "PodDisruptionBudget" not in kinds(objects) and len([o for o in objects if o["kind"] == "Service"]) == 1


def _active_active(chart, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return render(chart, _merge(_merge(POOL, {"inferenceExtension": ACTIVE_ACTIVE}), extra or {}))


def test_active_active_replicas_share_through_the_headless_peers_service(chart) -> None:  # type: ignore[no-untyped-def]
    objects = _active_active(chart)
    check_objects(objects)
    args = build_parser().parse_args(_epp(objects)["args"])
    assert (args.peer_service, args.peer_port, args.shutdown_delay, args.peers) == ("llm-pool-epp-peers", 9004, 5.0, "")
    peers = one(objects, "Service", "llm-pool-epp-peers")
    port = {"name": "peers", "port": 9004, "targetPort": 9004, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}
    assert peers["spec"] == {"clusterIP": "None", "selector": {"app": "llm-pool-epp"}, "ports": [port]}
    rules = one(objects, "Role")["rules"]
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]} in rules
    assert not [r for r in rules if r["apiGroups"] == ["coordination.k8s.io"]]
    assert one(objects, "PodDisruptionBudget")["spec"] == {"minAvailable": 1, "selector": {"matchLabels": {"app": "llm-pool-epp"}}}
    # the options `epp serve` builds from those flags: discovery by that Service, at its port `peers`
    peer_opts = _peer_options(args)
    assert peer_opts is not None and (peer_opts.service, peer_opts.port, peer_opts.peers) == ("llm-pool-epp-peers", 9004, ())

    moved = _active_active(chart, {"inferenceExtension": {"activeActive": {"peerPort": 9100}, "flags": {"shutdown-delay": "15s"}}})
    check_objects(moved)
    args = build_parser().parse_args(_epp(moved)["args"])
    assert (args.peer_port, args.shutdown_delay) == (9100, 15.0)
    assert one(moved, "Service", "llm-pool-epp-peers")["spec"]["ports"][0]["port"] == 9100
    assert {"name": "peers", "containerPort": 9100} in _epp(moved)["ports"]

    # llm-d's standalone shape (no InferencePool, pods by label) shares the same way
    standalone = render(chart, _example(CHART / "examples" / "llm-d-standalone.yaml"))
    assert build_parser().parse_args(_epp(standalone)["args"]).peer_service == "llm-pool-epp-peers"


def test_active_active_replicas_that_do_not_share(chart) -> None:  # type: ignore[no-untyped-def]
    objects = _active_active(chart, {"inferenceExtension": {"activeActive": {"share": False}}})
    check_objects(objects)
    args = build_parser().parse_args(_epp(objects)["args"])
    assert (args.peer_service, args.peers) == ("", "")
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Service"] == ["llm-pool-epp"]
    assert not [r for r in one(objects, "Role")["rules"] if r["apiGroups"] == ["discovery.k8s.io"]]
    # still all serving: rolled one at a time, drained, and kept through node drains
    assert one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert args.shutdown_delay == 5.0 and one(objects, "PodDisruptionBudget")


def test_llm_d_router_values_land_where_gie_s_do(chart) -> None:  # type: ignore[no-untyped-def]
    gie = {"inferencePool": {"modelServers": {"matchLabels": {"app": "m"}}, "targetPorts": [{"number": 8200}], "modelServerType": "sglang"},
           "inferenceExtension": {"replicas": 2, "failureMode": "FailClose", "image": {"repository": "me/llm-epp", "tag": "v1"},
                                  "flags": {"v": 4}, "extraServicePorts": [{"name": "http", "port": 80}],
                                  "pluginsConfigFile": "c.yaml", "pluginsCustomConfig": {"c.yaml": CONFIG},
                                  "tracing": {"enabled": True, "otelExporterEndpoint": "http://otel:4317"}},
           "inferenceObjectives": [{"name": "a", "priority": 1}], "experimentalHttpRoute": {"enabled": True, "inferenceGatewayName": "gw"}}  # fmt: skip
    llmd = {"router": {"modelServers": {"matchLabels": {"app": "m"}, "targetPorts": [{"number": 8200}], "type": "sglang"},
                       "inferencePool": {"failureMode": "FailClose"}, "inferenceObjectives": [{"name": "a", "priority": 1}],
                       "epp": {"replicas": 2, "image": {"repository": "me/llm-epp", "tag": "v1"}, "flags": {"v": 4},
                               "pluginsConfigFile": "c.yaml", "pluginsCustomConfig": {"c.yaml": CONFIG}},
                       "extraServicePorts": [{"name": "http", "port": 80}],
                       "tracing": {"enabled": True, "otelExporterEndpoint": "http://otel:4317"}},
            "httpRoute": {"create": True, "inferenceGatewayName": "gw"}}  # fmt: skip
    assert render(chart, gie) == render(chart, llmd)
    check_objects(render(chart, llmd))


def test_standalone_mode_selects_pods_by_label(chart) -> None:  # type: ignore[no-untyped-def]
    objects = render(chart, _example(CHART / "examples" / "llm-d-standalone.yaml"))
    opts = _kubernetes_options(build_parser().parse_args(_epp(objects)["args"]))
    assert (opts.pool_name, opts.endpoint_selector, opts.endpoint_target_ports) == ("", "app=my-model-service", "8000,8001")
    assert not opts.leader_election and one(objects, "Deployment")["spec"]["replicas"] == 2
    assert ("inference.networking.k8s.io", ["inferencepools"]) not in [(r["apiGroups"][0], r["resources"]) for r in one(objects, "Role")["rules"]]


def test_monitoring_tracing_objectives_sidecar_and_dashboard(chart) -> None:  # type: ignore[no-untyped-def]
    values = _merge(POOL, {
        "inferenceExtension": {
            "monitoring": {"interval": "5s", "prometheus": {"enabled": True, "extraLabels": {"release": "prom"}}},
            "tracing": {"enabled": True, "otelExporterEndpoint": "http://otel:4317", "sampling": {"samplerArg": "0.25"}},
            "sidecar": {"enabled": True, "name": "helper", "image": "busybox:1", "args": ["sleep", "inf"],
                        "configMap": {"name": "helper-config", "data": {"a": "b"}}},
            "env": {"EXTRA": 1},
        },
        "inferenceObjectives": [{"name": "batch", "priority": -1}],
        "grafanaDashboard": {"enabled": True},
    })  # fmt: skip
    objects = render(chart, values)
    check_objects(objects)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics", "interval": "5s"}]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()
    container = _epp(objects)
    args = build_parser().parse_args(container["args"])
    assert args.tracing and args.tracing_sample_ratio == 0.25
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317" and env["EXTRA"] == "1"
    objective = one(objects, "InferenceObjective", "batch")
    assert objective["spec"] == {"priority": -1, "poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "llm-pool"}}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["epp", "helper"]
    assert one(objects, "ConfigMap", "helper-config")["data"] == {"a": "b"}
    dashboard = one(objects, "ConfigMap", "llm-pool-epp-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["llm-epp-dashboard.json"].strip() == (REPO / "manifests/grafana/llm-epp-dashboard.json").read_text().strip()


def test_the_charts_dashboard_is_the_one_in_manifests_grafana() -> None:
    assert (CHART / "files/llm-epp-dashboard.json").read_bytes() == (REPO / "manifests/grafana/llm-epp-dashboard.json").read_bytes()


# -- refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"inferencePool": {"modelServers": {"matchLabels": {}}}}, "inferencePool.modelServers.matchLabels (router.modelServers.matchLabels) is required"),
        ({"provider": {"name": "gke"}}, "provider.name gke is not supported"),
        ({"provider": {"name": "gke-l7"}}, "provider.name \"gke-l7\": expected none, istio"),
        ({"provider": {"gke": {"autopilot": True}}}, "provider.gke is not supported"),
        ({"inferencePool": {"modelServerProtocol": "grpc"}}, "modelServerProtocol grpc is not supported by llm-epp"),
        ({"inferencePool": {"parser": "vllmgrpc-parser"}}, "parser vllmgrpc-parser is not supported"),
        ({"inferencePool": {"modelServerType": "tgi"}}, "inferencePool.modelServerType \"tgi\""),
        ({"inferencePool": {"apiVersion": "inference.networking.x-k8s.io/v1alpha2"}}, "inferencePool.apiVersion"),
        ({"inferencePool": {"targetPorts": [{"number": p} for p in range(8000, 8009)]}}, "expected 1 to 8 ports, got 9"),
        ({"inferencePool": {"targetPorts": [{"number": 70000}]}}, "targetPorts[0].number: expected a port"),
        ({"inferenceExtension": {"monitoring": {"prometheus": {"enabled": True, "auth": {"enabled": True}}}}}, "has no authentication"),
        ({"inferenceExtension": {"monitoring": {"prometheus": {"auth": {"secretName": "s"}}}}}, "auth.secretName is not supported"),
        ({"inferenceExtension": {"monitoring": {"gke": {"enabled": True}}}}, "monitoring.gke is not supported"),
        ({"router": {"monitoring": {"provider": {"name": "gmp"}}}}, "router.monitoring.provider.name \"gmp\""),
        ({"inferenceExtension": {"tracing": {"sampling": {"sampler": "always_on"}}}}, "sampler \"always_on\" is not supported"),
        ({"inferenceExtension": {"tracing": {"sampling": {"samplerArg": "2"}}}}, "expected a ratio from 0 to 1"),
        ({"inferenceExtension": {"latencyPredictor": {"enabled": True, "trainingServer": {"port": 8000}}}}, "there is no training server"),
        ({"inferenceExtension": {"failureMode": "FailClosed"}}, "spelled FailClose"),
        ({"inferenceExtension": {"failureMode": "Sometimes"}}, "expected FailOpen or FailClose"),
        ({"inferenceExtension": {"image": {"registry": "registry.k8s.io", "repository": "gateway-api-inference-extension/epp"}}}, "is the reference EPP's image"),
        ({"inferenceExtension": {"image": {"hub": "ghcr.io/llm-d", "name": "llm-d-inference-scheduler"}}}, "is the reference EPP's image"),
        ({"inferenceExtension": {"pluginsConfigFile": "missing.yaml"}}, "\"missing.yaml\" is not one of the chart's config files"),
        ({"inferenceExtension": {"replicas": 0}}, "inferenceExtension.replicas: expected 1 or more"),
        ({"inferenceExtension": {"flags": {"pool-name": "x"}}}, "inferenceExtension.flags.pool-name: the chart sets it"),
        ({"inferenceExtension": {"flags": {"total-queued-requests-metric": "q"}}}, "llm-epp has no flag --total-queued-requests-metric"),
        ({"inferenceExtension": {"flags": {"no-such-flag": 1}}}, "`epp serve` has no flag --no-such-flag"),
        ({"inferenceExtension": {"flags": {"explain-scores": "maybe"}}}, "flags.explain-scores: expected true or false"),
        ({"inferenceExtension": {"flags": {"metrics-endpoint-auth": True}}}, "metrics-endpoint-auth=true is not supported"),
        ({"inferenceExtension": {"flags": {"zap-encoder": "xml"}}}, "expected json or console"),
        ({"inferenceExtension": {"flags": {"zap-encoder": "json", "log-format": "text"}}}, "not both"),
        ({"inferenceExtension": {"flags": {"v": "loud"}}}, "expected a verbosity level"),
        ({"inferenceExtension": {"sidecar": {"enabled": True, "name": "s", "image": "i", "configMapData": {"a": "b"}}}}, "sidecar.configMapData is not supported"),
        ({"inferenceExtension": {"sidecar": {"enabled": True}}}, "sidecar.name is required"),
        ({"inferenceExtension": {"endpointsServer": {"createInferencePool": False}}}, "inferenceExtension.endpointsServer: not a key"),
        ({"inferenceExtension": {"replica": 2}}, "inferenceExtension.replica: not a key"),
        ({"inferenceExtension": {"image": {"digest": "sha256:x"}}}, "inferenceExtension.image.digest: not a key"),
        ({"inferencePools": {}}, "values.inferencePools: not a key"),
        ({"provider": {"istio": {"destinationRule": {"trafficPolicy": {"tls": {"mode": "SIMPLE"}}}}}}, "trafficPolicy.tls is not supported"),
        ({"router": {"tokenizer": {"enabled": True, "modelName": "m"}}}, "router.tokenizer.enabled is not supported"),
        ({"router": {"proxy": {"enabled": True}}}, "router.proxy.enabled is not supported"),
        ({"router": {"epp": {"tokenizer": {}}}}, "router.epp.tokenizer: not a key"),
        ({"router": {"inferencePool": {"create": False}, "inferenceObjectives": [{"name": "a"}]}}, "need the InferencePool"),
        ({"router": {"inferencePool": {"create": False}}, "httpRoute": {"create": True}}, "routes to the InferencePool"),
        ({"gateway": {"create": True}}, "gateway.create needs gateway.className"),
        ({"inferenceObjectives": [{"priority": 1}]}, "inferenceObjectives[0].name is required"),
        ({"inferenceExtension": {"replicas": 2, "activeActive": {"share": True}}}, "active-active peers and leader election exclude each other"),
        ({"inferenceExtension": {"replicas": 2, "flags": {"ha-enable-leader-election": True}, "activeActive": {"share": False}}}, "exclude each other"),
        ({"inferenceExtension": {"activeActive": {"share": True}}}, "activeActive needs inferenceExtension.replicas greater than 1 (active-active replicas), got 1"),
        ({"inferenceExtension": {**ACTIVE_ACTIVE, "activeActive": {"share": "yes"}}}, "activeActive.share: expected true or false"),
        ({"inferenceExtension": {**ACTIVE_ACTIVE, "activeActive": {"share": False, "peerPort": 9100}}}, "peerPort is used only when the replicas share"),
        ({"inferenceExtension": {**ACTIVE_ACTIVE, "activeActive": {"peerPort": 9002}}}, "peerPort 9002 is already the EPP's"),
        ({"inferenceExtension": {**ACTIVE_ACTIVE, "activeActive": {"peerPort": 0}}}, "activeActive.peerPort: expected a port"),
        ({"inferenceExtension": {**ACTIVE_ACTIVE, "activeActive": {"peers": "a:1"}}}, "inferenceExtension.activeActive.peers: not a key"),
        ({"inferenceExtension": {"flags": {"peers": "10.0.0.7:9004"}}}, "inferenceExtension.flags.peers: with replicas > 1"),
        ({"inferenceExtension": {"flags": {"peer-service": "mine"}}}, "inferenceExtension.flags.peer-service: the chart sets it"),
        ({"inferenceExtension": {"flags": {"peer-port": 9100}}}, "set inferenceExtension.activeActive.peerPort"),
        ({"inferenceExtension": {"flags": {"replica-id": "a"}}}, "every replica of the Deployment would get the same id"),
    ],
)  # fmt: skip
def test_values_it_cannot_honour_are_refused_with_the_key_and_reason(chart, extra: dict[str, Any], message: str) -> None:  # type: ignore[no-untyped-def]
    values = _merge(POOL, extra)
    if extra.get("inferencePool", {}).get("modelServers") == {"matchLabels": {}}:
        values["inferencePool"]["modelServers"] = {"matchLabels": {}}
    assert message in refusal(chart, values)


# -- kustomize and helm: the same core objects ---------------------------------------------------


def _core(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """What must agree between the two renderings: names that only the two tools choose differently
    (the ConfigMap's hash, the ServiceAccount) and labels are left out; the EPP's flags as parsed."""
    deploy = one(objects, "Deployment", "llm-pool-epp")
    pod = copy.deepcopy(deploy["spec"]["template"]["spec"])
    pod.pop("serviceAccountName")
    args = vars(build_parser().parse_args(pod["containers"][0].pop("args")))
    config_file = Path(args.pop("config_file"))  # its name inside /config differs
    (volume,) = pod.pop("volumes")
    config = one(objects, "ConfigMap", volume["configMap"]["name"])["data"][config_file.name]
    pool = one(objects, "InferencePool", "llm-pool")["spec"]
    service = one(objects, "Service", "llm-pool-epp")["spec"]
    service.pop("type", None)
    return {
        "replicas": deploy["spec"]["replicas"],
        "strategy": deploy["spec"].get("strategy"),
        "pod": pod,
        "args": args,
        "config": yaml.safe_load(config),
        "pool": pool,
        "service": service,
        "rules": one(objects, "Role")["rules"],
        # active-active: the headless Service the replicas find each other by, and the PDB
        "peers": [o["spec"] for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "llm-pool-epp-peers"],
        "pdb": [o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"],
    }


@needs_kubectl
@pytest.mark.parametrize("tree", ["base", "components/ha", "components/active-active", "wide-ep"])
def test_kustomize_and_helm_render_the_same_core_objects(chart, tree: str) -> None:  # type: ignore[no-untyped-def]
    root = REPO / "manifests"
    values = _example(CHART / "examples" / "kustomize-base.yaml")
    if tree == "base":
        kustomized = kustomize(root)
    elif tree == "components/ha":
        kustomized = kustomize(root, components=("components/ha",), tree=root)
        values = _merge(values, {"inferenceExtension": {"replicas": 2}})
    elif tree == "components/active-active":
        kustomized = kustomize(root, components=("components/active-active",), tree=root)
        values = _merge(values, {"inferenceExtension": ACTIVE_ACTIVE})
    else:  # the wide-EP example: the base's EPP with its own config and an eight-port pool
        kustomized = kustomize(root / "wide-ep")
        values = _merge(values, {
            "inferencePool": {"modelServers": {"matchLabels": {"app": "vllm-wide-ep"}},
                              "targetPorts": [{"number": p} for p in range(8000, 8008)]},
            "inferenceExtension": {"pluginsConfigFile": "wide-ep.yaml",
                                   "pluginsCustomConfig": {"wide-ep.yaml": (root / "wide-ep" / "config.yaml").read_text()}},
        })  # fmt: skip
    k, h = _core(kustomized), _core(render(chart, values))
    if tree != "components/ha":  # the kustomize base grants its Lease even to one replica; the chart only with leader election
        k["rules"] = [r for r in k["rules"] if r["apiGroups"] not in (["coordination.k8s.io"], [""]) or r["resources"] == ["pods"]]
    assert h == k


@needs_kubectl
@pytest.mark.parametrize("gateway", ["istio", "kgateway", "envoy-gateway"])
def test_kustomize_gateway_overlays_and_the_charts_providers_agree(chart, gateway: str) -> None:  # type: ignore[no-untyped-def]
    overlay = kustomize(REPO / "manifests" / "gateways" / gateway)
    values = _merge(_example(CHART / "examples" / "kustomize-base.yaml"),
                    {"provider": {"name": gateway}, "experimentalHttpRoute": {"enabled": True}, "gateway": {"create": True}})  # fmt: skip
    charted = render(chart, values)
    assert one(charted, "Gateway")["spec"] == one(overlay, "Gateway")["spec"]
    k_route, h_route = one(overlay, "HTTPRoute")["spec"], one(charted, "HTTPRoute")["spec"]
    assert h_route == k_route
    assert {o["kind"] for o in overlay} <= kinds(charted)
    if gateway == "istio":
        k_rule, h_rule = one(overlay, "DestinationRule")["spec"], one(charted, "DestinationRule")["spec"]
        assert h_rule["host"] == f"{k_rule['host']}.llm.svc.cluster.local"
        assert h_rule["trafficPolicy"] == k_rule["trafficPolicy"]
    if gateway == "envoy-gateway":
        assert one(charted, "GatewayClass")["spec"] == one(overlay, "GatewayClass")["spec"]
        k_policy, h_policy = one(overlay, "BackendTrafficPolicy")["spec"], one(charted, "BackendTrafficPolicy")["spec"]
        assert h_policy["timeout"] == k_policy["timeout"]
        assert h_policy["targetRefs"] == [{**k_policy["targetRefs"][0], "name": "llm-pool"}]


# -- the docs name every key -----------------------------------------------------------------------

_KNOWN = re.compile(r'\(dict "path" "([^"]+)" "map" [^()]*"keys" \(list ((?:"[^"]+" ?)+)\)\)')
_TOKEN = re.compile(r"`([A-Za-z.][\w.*-]*)`")


def _documented() -> set[str]:
    """Backticked keys in docs/helm.md, `.sub` shorthands read against the cell's last full key."""
    out: set[str] = set()
    for line in (REPO / "docs" / "helm.md").read_text().splitlines():
        for cell in line.split("|"):
            parent = ""
            for token in _TOKEN.findall(cell):
                if token.startswith(".") and parent:
                    out.add(parent + token)
                elif not token.startswith("."):
                    out.add(token)
                    parent = token.rsplit(".", 1)[0]
    return out


def test_docs_helm_md_names_every_key_the_chart_reads() -> None:
    documented = _documented()
    known = [(path, key) for path, keys in _KNOWN.findall((CHART / "templates" / "_values.tpl").read_text())
             if path != "values" for key in re.findall(r'"([^"]+)"', keys)]  # fmt: skip
    assert len(known) > 100
    missing = [f"{path}.{key}" for path, key in known
               if not any(t == f"{path}.{key}" or t.startswith(f"{path}.{key}.") for t in documented)]  # fmt: skip
    assert missing == []
