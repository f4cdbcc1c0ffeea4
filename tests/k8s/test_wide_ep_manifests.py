"""The wide-EP example (manifests/wide-ep), rendered with `kubectl kustomize` as a user applies it, with
and without its `precise` component: the EPP is the base's, unchanged; the LeaderWorkerSets have only
fields the LWS v1 API knows and pod templates the Kubernetes API accepts; the pool lists every rank
port; each pod's vLLM command, run with the environment LWS gives each pod of a group (a stub `vllm`
records the argv), asks for one API server per rank on exactly those ports, covers every global DP rank
once, and binds each rank's KV-event socket where the EPP dials it (vLLM's port-plus-global-rank rule);
the decode sidecar fronts every rank; both EPP configs load and agree with the engines' flags."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from pickers.config.loader import load_config
from tests.k8s.kustomize import named, needs_kubectl, of_kind, render
from tests.k8s.test_manifests import _check_shape, _pool_schema, validate

pytestmark = needs_kubectl

ROOT = Path(__file__).resolve().parents[2] / "manifests"
WIDE_EP = ROOT / "wide-ep"
LWS_API = "leaderworkerset.x-k8s.io/v1"
# LeaderWorkerSet v1 (kubernetes-sigs/lws api/leaderworkerset/v1): the fields each level has
LWS_SPEC = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy",
                "volumeClaimTemplates", "persistentVolumeClaimRetentionPolicy"}  # fmt: skip
LWS_RESTART_POLICIES = {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
GROUPS = ("vllm-wide-ep-prefill", "vllm-wide-ep-decode")


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(WIDE_EP)


@pytest.fixture(scope="module")
def precise() -> list[dict[str, Any]]:
    return render(WIDE_EP, components=("precise",), tree=ROOT)


def _container(lws: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"] if c["name"] == name]
    return c


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _pool(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (pool,) = of_kind(objs, "InferencePool")
    return pool


def _target_ports(objs: list[dict[str, Any]]) -> list[int]:
    return [p["number"] for p in _pool(objs)["spec"]["targetPorts"]]


def _epp_config(objs: list[dict[str, Any]]) -> tuple[str, str]:
    """The EPP's config as mounted: the ConfigMap its Deployment's volume names, and that text."""
    deploy = named(objs, "Deployment", "llm-pool-epp")
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    cm = named(objs, "ConfigMap", volume["configMap"]["name"])
    return cm["metadata"]["name"], cm["data"]["config.yaml"]


def _model(objs: list[dict[str, Any]]) -> str:
    (cm,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("llm-model-")]
    return cm["data"]["model"]


def _flags(argv: list[str]) -> dict[str, str | bool]:
    """`--flag value` / `--flag` pairs of a vLLM command line (every flag appears once)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--") and flag not in out, (flag, argv)
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[flag] = argv[i + 1]
            i += 2
        else:
            out[flag] = True
            i += 1
    return out


def launch(objs: list[dict[str, Any]], group: str, worker: int, tmp_path: Path) -> list[str]:
    """What the group's vllm container execs on its `worker`-th pod: its command, run by bash with the
    container's environment plus what LWS and the downward API give that pod, `vllm` a stub that
    records its arguments."""
    lws = named(objs, "LeaderWorkerSet", group)
    container = _container(lws, "vllm")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    record = tmp_path / f"{group}-{worker}.json"
    stub = bindir / "vllm"
    stub.write_text(f'#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open("{record}", "w"))\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    pod_ip = f"10.1.{GROUPS.index(group)}.{worker + 10}"
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        **_env(container),
        "MODEL": _model(objs),
        "POD_IP": pod_ip,
        "VLLM_NIXL_SIDE_CHANNEL_HOST": pod_ip,
        # what the LWS controller sets in every container of a group's pods
        "LWS_LEADER_ADDRESS": f"{group}-0.{group}.llm.svc.cluster.local",
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"]["size"]),
        "LWS_WORKER_INDEX": str(worker),
    }
    result = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(record.read_text())


def test_the_epp_is_the_base_one_unchanged(objects) -> None:
    kustomization = yaml.safe_load((WIDE_EP / "kustomization.yaml").read_text())
    assert "../epp" in kustomization["resources"]
    base = render(ROOT)
    for kind, name in (("ServiceAccount", "llm-epp"), ("Role", "llm-epp"), ("RoleBinding", "llm-epp"),
                       ("Service", "llm-pool-epp"), ("Deployment", "llm-pool-epp")):  # fmt: skip
        ours, theirs = copy.deepcopy(named(objects, kind, name)), named(base, kind, name)
        if kind == "Deployment":  # the config ConfigMap's name carries its content's hash
            for d in (ours, theirs):
                for v in d["spec"]["template"]["spec"]["volumes"]:
                    v["configMap"]["name"] = v["configMap"]["name"].rsplit("-", 1)[0]
        assert ours == theirs, kind


def test_the_leader_worker_sets_have_only_known_fields(objects) -> None:
    found = of_kind(objects, "LeaderWorkerSet")
    assert sorted(o["metadata"]["name"] for o in found) == sorted(GROUPS)
    selector = _pool(objects)["spec"]["selector"]["matchLabels"]
    for lws in found:
        name = lws["metadata"]["name"]
        assert lws["apiVersion"] == LWS_API
        spec = lws["spec"]
        assert set(spec) <= LWS_SPEC, name
        assert spec["startupPolicy"] in LWS_STARTUP_POLICIES
        template = spec["leaderWorkerTemplate"]
        assert set(template) <= LWS_TEMPLATE, name
        assert template["restartPolicy"] in LWS_RESTART_POLICIES
        assert isinstance(template["size"], int) and template["size"] >= 1
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
        _check_shape(template["workerTemplate"], "V1PodTemplateSpec", f"{name}.workerTemplate")
        labels = template["workerTemplate"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        assert labels["llm-d.ai/role"] == name.rsplit("-", 1)[1]  # what prefill-filter / decode-filter read


def test_the_pool_lists_every_rank_port_and_validates(objects, precise) -> None:
    for objs in (objects, precise):
        assert validate(_pool(objs), _pool_schema()) == []
    ports = _target_ports(objects)
    prefill = named(objects, "LeaderWorkerSet", "vllm-wide-ep-prefill")
    env = _env(_container(prefill, "vllm"))
    local = int(env["DP_SIZE_LOCAL"])
    assert ports == [int(env["RANK_PORT"]) + i for i in range(local)] == list(range(8000, 8008))
    for group in GROUPS:  # every rank port is a port of the container serving it
        lws = named(objects, "LeaderWorkerSet", group)
        front = _container(lws, "pd-sidecar" if group.endswith("decode") else "vllm")
        assert set(ports) <= {p["containerPort"] for p in front["ports"]}, group


@pytest.mark.parametrize("variant", ["approximate", "precise"])
def test_each_pod_serves_its_ranks_on_the_pool_ports_and_the_group_covers_every_rank(variant, objects, precise, tmp_path) -> None:
    objs = precise if variant == "precise" else objects
    ports = _target_ports(objs)
    model = _model(objs)
    for group in GROUPS:
        lws = named(objs, "LeaderWorkerSet", group)
        container = _container(lws, "vllm")
        env = _env(container)
        size = lws["spec"]["leaderWorkerTemplate"]["size"]
        local = int(env["DP_SIZE_LOCAL"])
        named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        global_ranks: list[int] = []
        for worker in range(size):
            argv = launch(objs, group, worker, tmp_path)
            assert argv[:2] == ["serve", model]
            f = _flags(argv[2:])
            assert f["--enable-expert-parallel"] is True
            assert f["--data-parallel-multi-port-external-lb"] is True  # one API server per local rank
            assert "--data-parallel-hybrid-lb" not in f and "--data-parallel-rank" not in f
            assert int(f["--data-parallel-size"]) == size * local
            assert int(f["--data-parallel-size-local"]) == local == len(ports)
            start = int(f["--data-parallel-start-rank"])
            assert start == worker * local
            assert f["--data-parallel-address"] == f"{group}-0.{group}.llm.svc.cluster.local"
            assert f["--data-parallel-rpc-port"] == "5555"
            rank_ports = [int(f["--port"]) + i for i in range(local)]  # vLLM's DP supervisor: local rank i on port+i
            assert set(rank_ports) <= set(named_ports.values())
            supervisor = int(f["--data-parallel-supervisor-port"])
            assert supervisor == named_ports["supervisor"] and supervisor not in rank_ports
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"]["port"] == "supervisor"
            if group.endswith("prefill"):
                assert rank_ports == ports
            else:
                decoder = urllib.parse.urlsplit(_sidecar_flags(lws)["--decoder"])
                assert rank_ports == [decoder.port + i for i in range(local)]
            kv = json.loads(f["--kv-transfer-config"])
            assert kv["kv_connector"] == "NixlConnector"
            global_ranks += [start + i for i in range(local)]
            _check_kv_events(variant, objs, f, start, local)
        assert sorted(global_ranks) == list(range(size * local)), group


def _check_kv_events(variant: str, objs: list[dict[str, Any]], f: dict[str, str | bool], start: int, local: int) -> None:
    if variant == "approximate":
        assert "--kv-events-config" not in f
        return
    cfg = json.loads(str(f["--kv-events-config"]))
    assert cfg["enable_kv_cache_events"] is True and cfg["publisher"] == "zmq"
    producer = yaml.safe_load(_epp_config(objs)[1])
    (params,) = [p["parameters"] for p in producer["plugins"] if p["type"] == "precise-prefix-cache-producer"]
    events = params["kvEventsConfig"]
    assert cfg["topic"].startswith(events["topicFilter"])
    scheme, _, port = cfg["endpoint"].rpartition(":")
    assert scheme == "tcp://*"  # binds (vLLM binds an endpoint with '*', else connects)
    # vLLM's ZmqEventPublisher binds rank r at the endpoint's port + r, r the global DP rank
    # (vllm/distributed/kv_events.py); the EPP dials socketPort + the rank's index on its pod.
    bound = [int(port) + (start + i) for i in range(local)]
    assert bound == [events["podDiscoveryConfig"]["socketPort"] + i for i in range(local)]
    assert int(f["--block-size"]) == params["tokenProcessorConfig"]["blockSizeTokens"]


def _sidecar_flags(lws: dict[str, Any]) -> dict[str, str]:
    args = _container(lws, "pd-sidecar")["args"]
    return dict(a.split("=", 1) for a in args)


def test_the_decode_sidecar_fronts_every_rank(objects) -> None:
    ports = _target_ports(objects)
    decode = named(objects, "LeaderWorkerSet", "vllm-wide-ep-decode")
    sidecar = _container(decode, "pd-sidecar")
    assert sidecar["command"] == ["pd-sidecar"]
    f = _sidecar_flags(decode)
    local = int(_env(_container(decode, "vllm"))["DP_SIZE_LOCAL"])
    assert int(f["--data-parallel-size"]) == local
    assert [int(f["--port"]) + i for i in range(local)] == ports  # rank i listens on port+i
    decoder = urllib.parse.urlsplit(f["--decoder"])
    assert decoder.hostname == "127.0.0.1" and decoder.port == int(_env(_container(decode, "vllm"))["RANK_PORT"])
    assert {p["containerPort"] for p in sidecar["ports"]} == set(ports)


def test_the_sidecar_flags_are_ones_pd_sidecar_accepts(objects) -> None:
    from pd_sidecar.cli import build_parser

    parser = build_parser()
    if "--data-parallel-size" not in parser._option_string_actions:
        pytest.skip("pd-sidecar has no --data-parallel-size yet (added on branch dp-sidecar)")
    decode = named(objects, "LeaderWorkerSet", "vllm-wide-ep-decode")
    args = parser.parse_args(_container(decode, "pd-sidecar")["args"])
    assert args.data_parallel_size == len(_target_ports(objects))


def test_the_epp_config_is_llm_ds_wide_ep_shape(objects) -> None:
    _, text = _epp_config(objects)
    cfg = load_config(text, "wide-ep config")
    assert cfg.warnings == ()
    assert cfg.profile_handler.type == "disagg-profile-handler"
    assert cfg.plugin_types["always-disagg-pd-decider"] == "always-disagg-pd-decider"
    profiles = {p.name: p for p in cfg.profiles}
    assert [(w.scorer.type, w.weight) for w in profiles["prefill"].scorers] == [
        ("prefix-cache-scorer", 3.0), ("queue-scorer", 2.0), ("active-request-scorer", 2.0)]  # fmt: skip
    assert [f.type for f in profiles["prefill"].filters] == ["prefill-filter"]
    assert [(w.scorer.type, w.weight) for w in profiles["decode"].scorers] == [("active-request-scorer", 1.0)]
    assert [f.type for f in profiles["decode"].filters] == ["decode-filter"]


def test_the_precise_component_swaps_the_config_and_adds_the_render_service(objects, precise) -> None:
    name, text = _epp_config(precise)
    assert name != _epp_config(objects)[0]
    cfg = load_config(text, "wide-ep precise config")
    assert cfg.warnings == ()
    assert cfg.plugin_parameters["token-producer"]["modelName"] == _model(precise)
    params = cfg.plugin_parameters["precise-prefix-cache-producer"]
    ranks = sum(
        named(precise, "LeaderWorkerSet", g)["spec"]["replicas"] * named(precise, "LeaderWorkerSet", g)["spec"]["leaderWorkerTemplate"]["size"]
        * int(_env(_container(named(precise, "LeaderWorkerSet", g), "vllm"))["DP_SIZE_LOCAL"])
        for g in GROUPS
    )  # fmt: skip
    assert params["indexerConfig"]["kvBlockIndexConfig"]["inMemoryConfig"]["podCacheSize"] >= ranks
    url = urllib.parse.urlsplit(cfg.plugin_parameters["token-producer"]["vllm"]["url"])
    render_svc = named(precise, "Service", url.hostname)
    prefill = named(precise, "LeaderWorkerSet", "vllm-wide-ep-prefill")
    assert render_svc["spec"]["selector"].items() <= prefill["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"].items()
    (port,) = render_svc["spec"]["ports"]
    assert port["port"] == url.port and port["targetPort"] in _target_ports(precise)
    _check_shape(render_svc, "V1Service", "render Service")
    for group in GROUPS:  # KV events on in both groups, off without the component
        for objs, on in ((precise, True), (objects, False)):
            env = _env(_container(named(objs, "LeaderWorkerSet", group), "vllm"))
            assert ("KV_EVENTS_PORT" in env) is on, group


def test_the_gateway_overlays_route_to_the_wide_ep_pool(objects) -> None:
    pool = _pool(objects)["metadata"]["name"]
    epp = _pool(objects)["spec"]["endpointPickerRef"]["name"]
    named(objects, "Service", epp)
    for gw in ("istio", "kgateway", "envoy-gateway", "agentgateway", "nginx-gateway-fabric"):
        (route,) = of_kind(render(ROOT / "gateways" / gw), "HTTPRoute")
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        assert backend["name"] == pool, gw
