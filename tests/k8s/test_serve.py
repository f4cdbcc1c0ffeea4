"""`epp serve` with Kubernetes: the flags, and gRPC readiness following pool sync and leadership,
with two EPP servers in-process against the API-server stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.cli.main import _kubernetes_options, build_parser
from extproc.kubernetes.runtime import KubernetesOptions
from extproc.server.runner import EXT_PROC_SERVICE, EppServer, ServeOptions
from pickers.framework.errors import ConfigError
from tests.k8s.conftest import eventually, pod, pool

SERVING = health_pb2.HealthCheckResponse.SERVING


def k8s_args(*argv: str):  # type: ignore[no-untyped-def]
    return _kubernetes_options(build_parser().parse_args(["serve", *argv]))


def test_pool_name_turns_on_kubernetes_discovery() -> None:
    opts = k8s_args("--pool-name", "p", "--pool-namespace", "ns", "--kubeconfig", "/k")
    assert opts == KubernetesOptions(kubeconfig="/k", pool_name="p", pool_namespace="ns")


def test_with_an_endpoints_file_pool_name_only_labels_metrics() -> None:
    assert k8s_args("--pool-name", "p", "--endpoints", "e.yaml") is None


def test_leader_election_flag_takes_go_style_booleans() -> None:
    assert k8s_args("--pool-name", "p", "--ha-enable-leader-election").leader_election
    assert k8s_args("--pool-name", "p", "--ha-enable-leader-election=true").leader_election
    assert not k8s_args("--pool-name", "p", "--ha-enable-leader-election=false").leader_election


def test_leader_election_durations_take_go_durations() -> None:
    opts = k8s_args("--pool-name", "p", "--ha-enable-leader-election", "--leader-election-lease-duration", "30s",
                    "--leader-election-renew-deadline", "20s", "--leader-election-retry-period", "500ms")  # fmt: skip
    assert (opts.lease_duration, opts.renew_deadline, opts.retry_period) == (30.0, 20.0, 0.5)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--endpoint-selector", "app=x"], "--endpoint-target-ports"),
        (["--endpoint-target-ports", "8000"], "--endpoint-target-ports"),
        (["--pool-name", "p", "--endpoint-selector", "app=x", "--endpoint-target-ports", "1"], "--endpoint-selector"),
        (["--endpoints", "f", "--endpoint-selector", "app=x", "--endpoint-target-ports", "1"], "--endpoint-selector"),
        (["--pool-name", "p", "--ha-enable-leader-election", "--leader-election-renew-deadline", "20s"],
         "--leader-election-renew-deadline"),
    ],
)  # fmt: skip
def test_conflicting_flags_are_config_errors(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        k8s_args(*argv)


# -- readiness ---------------------------------------------------------------------------------


@pytest.fixture
async def epps(kubeconfig) -> AsyncIterator[Callable[..., asyncio.Future[EppServer]]]:
    started: list[EppServer] = []

    async def start(**k8s) -> EppServer:  # type: ignore[no-untyped-def]
        k8s.setdefault("pool_name", "pool")
        opts = ServeOptions(
            grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1", pool_name="pool",
            refresh_metrics_interval=0.5, kubernetes=KubernetesOptions(kubeconfig=kubeconfig, pool_namespace="default", **k8s),
        )  # fmt: skip
        server = EppServer(opts)
        await server.start()
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for s in started:
        await s.stop(grace=0)


async def health(server: EppServer, service: str = "readiness") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


async def until_health(server: EppServer, status: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await health(server) != status:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"readiness never became {status}")
        await asyncio.sleep(0.05)


async def test_readiness_waits_for_the_pool_and_drops_when_it_is_deleted(apiserver, epps) -> None:
    apiserver.put("pods", pod("a", "127.0.0.2"))
    server = await epps()
    await asyncio.sleep(0.3)
    assert await health(server) != SERVING  # no pool yet
    assert await health(server, "liveness") == SERVING
    apiserver.put("inferencepools", pool())
    await until_health(server, SERVING)
    assert await health(server, EXT_PROC_SERVICE) == SERVING
    assert [e.address for e in server.datastore.candidates()] == ["127.0.0.2:8000"]
    apiserver.delete("inferencepools", "pool")
    await until_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert len(server.datastore) == 0


async def test_endpoint_selector_mode_is_ready_once_pods_are_listed(apiserver, epps) -> None:
    apiserver.put("pods", pod("a", "127.0.0.2"))
    server = await epps(pool_name="", endpoint_selector="app=vllm", endpoint_target_ports="8000,8001")
    await until_health(server, SERVING)
    assert len(server.datastore) == 2


async def test_with_leader_election_exactly_one_epp_is_ready_and_the_other_takes_over(apiserver, epps) -> None:
    apiserver.put("inferencepools", pool())
    le = dict(leader_election=True, lease_name="epp", lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)
    a = await epps(**le)
    await until_health(a, SERVING)
    b = await epps(**le)
    await asyncio.sleep(0.5)
    assert await health(b) != SERVING and await health(a) == SERVING
    assert b.datastore.synced  # the standby keeps its table warm
    await a.stop(grace=0)  # a clean stop hands the Lease over
    await until_health(b, SERVING, timeout=2.0)


async def test_serve_feeds_the_pools_objectives_and_rewrites_to_the_director(apiserver, epps) -> None:
    from tests.k8s.test_objectives import objective, rewrite

    apiserver.put("inferencepools", pool())
    apiserver.put("inferenceobjectives", objective("batch", -1))
    server = await epps()
    apiserver.put("inferencemodelrewrites", rewrite("canary", "alias", {"sim-model": 1}))
    await eventually(lambda: server.director.objectives.priority("batch") == -1)
    await eventually(lambda: server.director.rewrites.target("alias") == "sim-model")
    await until_health(server, SERVING)  # the objective watches never hold up readiness
