"""Kubernetes discovery against the API-server stand-in over real HTTP with the real client: the
endpoint table follows pods and the InferencePool through churn, 410 Gone, disconnects and outages."""

from __future__ import annotations

import logging

import msgspec
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.kubernetes.objects import Pod
from extproc.kubernetes.pool_discovery import (
    KubernetesDiscovery,
    PoolSpec,
    endpoints_for_pod,
    parse_endpoint_selector,
    parse_target_ports,
)
from pickers.framework.errors import ConfigError
from tests.k8s.conftest import eventually, pod, pool


def table(ds: Datastore) -> dict[str, str]:
    return {ep.address: ep.name for ep in ds.candidates()}


@pytest.fixture
def ds() -> Datastore:
    return Datastore()


@pytest.fixture
def follow_pool(api, ds, tasks):
    def start(name: str = "pool") -> KubernetesDiscovery:
        d = KubernetesDiscovery(api, ds, namespace="default", pool_name=name, watch_timeout=(30, 30))
        tasks(d.run())
        return d

    return start


@pytest.fixture
def follow_selector(api, ds, tasks):
    def start(labels: dict[str, str], ports: tuple[int, ...]) -> KubernetesDiscovery:
        d = KubernetesDiscovery(api, ds, namespace="default", spec=PoolSpec.of(labels, ports), watch_timeout=(30, 30))
        tasks(d.run())
        return d

    return start


# -- the pure part -------------------------------------------------------------------------------


def decode(obj: dict) -> Pod:
    return msgspec.json.decode(msgspec.json.encode(obj), type=Pod)


def test_a_ready_pod_has_one_endpoint_per_target_port_named_by_rank() -> None:
    specs = endpoints_for_pod(decode(pod("vllm-a", "10.1.2.3")), (8000, 8001))
    assert [(s.name, s.address) for s in specs] == [("vllm-a-rank-0", "10.1.2.3:8000"), ("vllm-a-rank-1", "10.1.2.3:8001")]


@pytest.mark.parametrize(
    "obj",
    [pod("p", ready=False), pod("p", ip=None), pod("p", deleting=True)],
    ids=["unready", "no-ip", "terminating"],
)
def test_a_pod_that_is_not_serving_has_no_endpoints(obj: dict) -> None:
    assert endpoints_for_pod(decode(obj), (8000,)) == []


def test_active_ports_annotation_narrows_ports_and_keeps_ranks() -> None:
    obj = pod("p", annotations={"inference.networking.k8s.io/active-ports": "8001"})
    assert [(s.name, s.port) for s in endpoints_for_pod(decode(obj), (8000, 8001))] == [("p-rank-1", 8001)]


def test_each_endpoint_carries_its_rank_the_targetports_index() -> None:
    obj = pod("p", annotations={"inference.networking.k8s.io/active-ports": "8001,8003"})
    specs = endpoints_for_pod(decode(obj), (8000, 8001, 8002, 8003))
    assert [(s.port, s.rank) for s in specs] == [(8001, 1), (8003, 3)]


def test_llm_d_active_ports_annotation_wins_over_the_gie_one() -> None:
    obj = pod("p", annotations={"llm-d.ai/active-ports": "8000", "inference.networking.k8s.io/active-ports": "8001"})
    assert [s.port for s in endpoints_for_pod(decode(obj), (8000, 8001))] == [8000]


LWS = {"app": "vllm", "leaderworkerset.sigs.k8s.io/name": "decode", "leaderworkerset.sigs.k8s.io/group-index": "2"}


@pytest.mark.parametrize(
    ("labels", "ports", "group"),
    [
        ({"app": "vllm"}, (8000,), ""),  # one rank per pod: no group
        ({"app": "vllm"}, (8000, 8001), "ns/p"),  # the pod's ranks step together
        (LWS, (8000,), "ns/decode/2"),  # a LeaderWorkerSet group spans its pods
        (LWS, (8000, 8001), "ns/decode/2"),
        ({**LWS, "llm-epp/dp-group": "wide-ep-a"}, (8000, 8001), "wide-ep-a"),  # the label wins
        ({"app": "vllm", "llm-epp/dp-group": "g"}, (8000,), "g"),
        ({"app": "vllm", "leaderworkerset.sigs.k8s.io/name": "decode"}, (8000,), ""),  # no group index: not a group
    ],
    ids=["single", "multi-port", "lws", "lws-multi-port", "label-over-lws", "label-single", "lws-no-index"],
)
def test_dp_group_of_a_pods_endpoints(labels: dict, ports: tuple[int, ...], group: str) -> None:
    specs = endpoints_for_pod(decode(pod("p", labels=labels, namespace="ns")), ports)
    assert {s.dp_group for s in specs} == {group}


def test_ipv6_pod_ips_are_bracketed() -> None:
    assert endpoints_for_pod(decode(pod("p", "fd00::5")), (8000,))[0].address == "[fd00::5]:8000"


def test_pod_labels_become_endpoint_labels() -> None:
    obj = pod("p", labels={"app": "vllm", "llm-d.ai/role": "decode"})
    assert endpoints_for_pod(decode(obj), (8000,))[0].labels == {"app": "vllm", "llm-d.ai/role": "decode"}


def test_a_pods_spec_hostname_is_on_each_of_its_endpoints() -> None:
    specs = endpoints_for_pod(decode(pod("vllm-0", hostname="vllm-0")), (8000, 8001))
    assert [s.hostname for s in specs] == ["vllm-0", "vllm-0"]
    assert endpoints_for_pod(decode(pod("p")), (8000,))[0].hostname == ""


def test_flag_parsers() -> None:
    assert parse_endpoint_selector("app=vllm,env=prod") == {"app": "vllm", "env": "prod"}
    assert parse_target_ports("8000,8001") == (8000, 8001)
    for bad in ("app", "=x", ""):
        with pytest.raises(ConfigError, match="--endpoint-selector"):
            parse_endpoint_selector(bad)
    for bad in ("", "80a", "0", "1,1", "1,2,3,4,5,6,7,8,9"):
        with pytest.raises(ConfigError, match="--endpoint-target-ports"):
            parse_target_ports(bad)


# -- pods --------------------------------------------------------------------------------------


async def test_pool_pods_are_listed_at_start_and_the_datastore_is_synced(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(ports=(8000, 8001)))
    apiserver.put("pods", pod("a", "10.0.0.1"))
    apiserver.put("pods", pod("other", "10.0.0.9", labels={"app": "other"}))
    follow_pool()
    await eventually(lambda: ds.synced)
    assert table(ds) == {"10.0.0.1:8000": "a-rank-0", "10.0.0.1:8001": "a-rank-1"}


async def test_an_empty_pool_is_synced_with_no_endpoints(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    follow_pool()
    await eventually(lambda: ds.synced)
    assert table(ds) == {}


async def test_pod_added_then_ready_then_unready_then_deleted(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    follow_pool()
    await eventually(lambda: ds.synced)
    apiserver.put("pods", pod("a", "10.0.0.1", ready=False))
    apiserver.put("pods", pod("b", "10.0.0.2"))
    await eventually(lambda: table(ds) == {"10.0.0.2:8000": "b-rank-0"})
    apiserver.put("pods", pod("a", "10.0.0.1", ready=True))
    await eventually(lambda: set(table(ds)) == {"10.0.0.1:8000", "10.0.0.2:8000"})
    apiserver.put("pods", pod("a", "10.0.0.1", ready=False))
    await eventually(lambda: set(table(ds)) == {"10.0.0.2:8000"})
    apiserver.put("pods", pod("b", "10.0.0.2", deleting=True))
    await eventually(lambda: table(ds) == {})
    apiserver.put("pods", pod("a", "10.0.0.1"))
    await eventually(lambda: set(table(ds)) == {"10.0.0.1:8000"})
    apiserver.delete("pods", "b")
    apiserver.delete("pods", "a")
    await eventually(lambda: table(ds) == {})


async def test_endpoints_that_stay_keep_their_state_through_pod_churn(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    ep = ds.get("10.0.0.1:8000")
    assert ep is not None
    ds.acquire(ep, 10)  # an in-flight request
    apiserver.put("pods", pod("b", "10.0.0.2"))
    await eventually(lambda: len(ds) == 2)
    assert ds.get("10.0.0.1:8000") is ep and ep.in_flight == 1
    apiserver.delete("pods", "a")
    await eventually(lambda: len(ds) == 1)
    ds.release(ep, 10)  # the request to the departed pod finishes normally
    assert ep.in_flight == 0


async def test_label_changes_move_pods_in_and_out_and_flow_into_endpoint_labels(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "other"}))
    follow_pool()
    await eventually(lambda: ds.synced)
    assert table(ds) == {}
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "vllm", "llm-d.ai/role": "prefill"}))
    await eventually(lambda: len(ds) == 1)
    assert ds.candidates()[0].labels["llm-d.ai/role"] == "prefill"
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "vllm", "llm-d.ai/role": "decode"}))
    await eventually(lambda: len(ds) == 1 and ds.candidates()[0].labels.get("llm-d.ai/role") == "decode")
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "other"}))
    await eventually(lambda: table(ds) == {})


async def test_a_pods_spec_hostname_flows_into_its_endpoint(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1", hostname="vllm-0"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    assert ds.candidates()[0].spec.hostname == "vllm-0"


async def test_active_ports_annotation_changes_the_table(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(ports=(8000, 8001, 8002)))
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 3)
    apiserver.put("pods", pod("a", "10.0.0.1", annotations={"inference.networking.k8s.io/active-ports": "8000,8002"}))
    await eventually(lambda: table(ds) == {"10.0.0.1:8000": "a-rank-0", "10.0.0.1:8002": "a-rank-2"})


async def test_endpoint_selector_mode_needs_no_pool(apiserver, ds, follow_selector) -> None:
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "vllm", "tier": "gold"}))
    apiserver.put("pods", pod("b", "10.0.0.2", labels={"app": "vllm"}))
    follow_selector({"app": "vllm", "tier": "gold"}, (8000, 8001))
    await eventually(lambda: ds.synced)
    assert table(ds) == {"10.0.0.1:8000": "a-rank-0", "10.0.0.1:8001": "a-rank-1"}
    assert apiserver.count("GET", "inferencepools") == 0


# -- the pool ------------------------------------------------------------------------------------


async def test_pool_selector_change_relists_pods(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(labels={"app": "vllm"}))
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "vllm"}))
    apiserver.put("pods", pod("b", "10.0.0.2", labels={"app": "next"}))
    follow_pool()
    await eventually(lambda: set(table(ds)) == {"10.0.0.1:8000"})
    lists = apiserver.count("GET", "pods", watch=False)
    apiserver.put("inferencepools", pool(labels={"app": "next"}))
    await eventually(lambda: set(table(ds)) == {"10.0.0.2:8000"})
    assert apiserver.count("GET", "pods", watch=False) == lists + 1
    apiserver.put("pods", pod("a", "10.0.0.1", labels={"app": "vllm"}))  # the old selector's pods no longer count
    apiserver.put("pods", pod("c", "10.0.0.3", labels={"app": "next"}))
    await eventually(lambda: set(table(ds)) == {"10.0.0.2:8000", "10.0.0.3:8000"})


async def test_pool_target_ports_change_updates_the_table(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(ports=(8000,)))
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    apiserver.put("inferencepools", pool(ports=(9000, 9001)))
    await eventually(lambda: table(ds) == {"10.0.0.1:9000": "a-rank-0", "10.0.0.1:9001": "a-rank-1"})


async def test_target_ports_reordered_give_the_same_endpoints_new_ranks(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(ports=(8000, 8001)))
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 2)
    ep = ds.get("10.0.0.1:8001")
    assert ep is not None and ep.spec.rank == 1
    ds.acquire(ep, 5)
    apiserver.put("inferencepools", pool(ports=(8001, 8000)))
    await eventually(lambda: ep.spec.rank == 0 and ep.name == "a-rank-0")
    assert ds.get("10.0.0.1:8001") is ep and ep.in_flight == 1  # same endpoint, its state kept


async def test_dp_group_labels_flow_into_the_endpoints(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool(ports=(8000, 8001)))
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 2)
    assert {ep.spec.dp_group for ep in ds.candidates()} == {"default/a"}
    apiserver.put("pods", pod("a", "10.0.0.1", labels={**LWS, "app": "vllm"}))
    await eventually(lambda: {ep.spec.dp_group for ep in ds.candidates()} == {"default/decode/2"})
    apiserver.put("pods", pod("a", "10.0.0.1", labels={**LWS, "llm-epp/dp-group": "g1"}))
    await eventually(lambda: {ep.spec.dp_group for ep in ds.candidates()} == {"g1"})


async def test_pool_deletion_clears_the_table_and_unsyncs_until_it_returns(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    apiserver.delete("inferencepools", "pool")
    await eventually(lambda: len(ds) == 0 and not ds.synced)
    apiserver.put("inferencepools", pool())
    await eventually(lambda: len(ds) == 1 and ds.synced)


async def test_a_missing_pool_is_not_synced(apiserver, ds, follow_pool) -> None:
    apiserver.put("pods", pod("a", "10.0.0.1"))
    d = follow_pool("absent")
    await eventually(lambda: d.pool_watch is not None and d.pool_watch.lists == 1)
    assert not ds.synced and len(ds) == 0
    apiserver.put("inferencepools", pool("absent"))
    await eventually(lambda: ds.synced and len(ds) == 1)


async def test_other_pools_in_the_namespace_are_ignored(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    apiserver.put("inferencepools", pool("other", labels={"app": "zzz"}))
    apiserver.delete("inferencepools", "other")
    apiserver.put("pods", pod("b", "10.0.0.2"))
    await eventually(lambda: len(ds) == 2)


# -- the API misbehaving ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_and_catches_up(apiserver, ds, follow_pool, as_http_status: bool) -> None:
    apiserver.gone_as_http_status = as_http_status
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    d = follow_pool()
    await eventually(lambda: len(ds) == 1 and d.pod_watch is not None)
    await eventually(lambda: len(apiserver.watchers) == 2)
    apiserver.bookmark_interval = None  # no bookmark may rescue the old version
    pod_lists = apiserver.count("GET", "pods", watch=False)
    # Changes happen while the watch is down, then the log is compacted: resuming is impossible.
    apiserver.drop_watches()
    apiserver.put("pods", pod("b", "10.0.0.2"))
    apiserver.delete("pods", "a")
    apiserver.compact()
    await eventually(lambda: table(ds) == {"10.0.0.2:8000": "b-rank-0"})
    assert apiserver.count("GET", "pods", watch=False) > pod_lists


async def test_watch_disconnect_resumes_from_the_last_resource_version(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    d = follow_pool()
    await eventually(lambda: len(ds) == 1)
    await eventually(lambda: len(apiserver.watchers) == 2)  # the pool's and the pods' watches are open
    pod_lists = apiserver.count("GET", "pods", watch=False)
    apiserver.drop_watches()
    apiserver.put("pods", pod("b", "10.0.0.2"))  # happens while disconnected: replayed from the log
    await eventually(lambda: len(ds) == 2 and len(apiserver.watchers) == 2)
    apiserver.end_watches()  # a clean server-side timeout: resume as well
    apiserver.put("pods", pod("c", "10.0.0.3"))
    await eventually(lambda: len(ds) == 3)
    assert apiserver.count("GET", "pods", watch=False) == pod_lists  # no re-list was needed
    assert d.pod_watch is not None
    resumed = [q for m, p, q in apiserver.requests if "/pods" in p and q.get("watch") in ("true", "True")]
    assert len(resumed) >= 3 and all(q.get("resourceVersion") for q in resumed)
    assert all(q.get("allowWatchBookmarks") in ("true", "True") for q in resumed)


async def test_bookmarks_advance_the_resource_version(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    d = follow_pool()
    await eventually(lambda: ds.synced and d.pod_watch is not None and d.pod_watch.resource_version is not None)
    assert d.pod_watch is not None
    before = int(d.pod_watch.resource_version or 0)
    apiserver.put("leases", {"metadata": {"name": "x"}, "spec": {}})
    await eventually(lambda: int(d.pod_watch.resource_version or 0) > before)  # type: ignore[union-attr]


async def test_api_down_keeps_the_last_table_and_logs_it_then_recovers(apiserver, ds, follow_pool, caplog) -> None:
    caplog.set_level(logging.INFO, logger="extproc.kubernetes.watch")
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    await apiserver.stop()
    await eventually(lambda: "keeping the last known state" in caplog.text)
    assert table(ds) == {"10.0.0.1:8000": "a-rank-0"} and ds.synced
    apiserver.put("pods", pod("b", "10.0.0.2"))  # changes while it was down come through on return
    await apiserver.start()
    await eventually(lambda: len(ds) == 2, timeout=8)
    await eventually(lambda: "reachable again" in caplog.text)


async def test_server_errors_keep_the_table_and_are_retried(apiserver, ds, follow_pool) -> None:
    apiserver.put("inferencepools", pool())
    apiserver.put("pods", pod("a", "10.0.0.1"))
    follow_pool()
    await eventually(lambda: len(ds) == 1)
    await eventually(lambda: len(apiserver.watchers) == 2)
    apiserver.fail_with = 500
    apiserver.drop_watches()
    n = len(apiserver.requests)
    await eventually(lambda: len(apiserver.requests) >= n + 2)  # retried, failing
    assert len(ds) == 1
    apiserver.fail_with = None
    apiserver.put("pods", pod("b", "10.0.0.2"))
    await eventually(lambda: len(ds) == 2, timeout=8)
