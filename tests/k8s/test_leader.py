"""Leader election on a Lease through the API-server stand-in: one leader at a time, failover within
the lease duration when the leader dies, immediate handover when it stops cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from kubernetes_asyncio.client import ApiClient

from extproc.kubernetes.client import make_api_client
from extproc.kubernetes.leader import LeaseElector, default_lease_name
from tests.k8s.conftest import eventually

LEASE = 1.0
RENEW = 0.6
RETRY = 0.1


@pytest.fixture
async def clients(apiserver, tmp_path) -> AsyncIterator[Callable[[str], asyncio.Future[ApiClient]]]:
    """A client per identity, each with its own token, so the API server can cut one of them off."""
    made: list[ApiClient] = []

    async def make(identity: str) -> ApiClient:
        path = apiserver.kubeconfig(str(tmp_path / f"kubeconfig-{identity}"), token=identity)
        client = await make_api_client(path)
        made.append(client)
        return client

    yield make  # type: ignore[misc]
    for c in made:
        await c.close()


async def elector(clients, identity: str) -> LeaseElector:
    return LeaseElector(
        await clients(identity), name="epp-lease", namespace="default", identity=identity,
        lease_duration=LEASE, renew_deadline=RENEW, retry_period=RETRY,
    )  # fmt: skip


class NeverTwo:
    """Samples the electors all along and remembers whether two ever led at once."""

    def __init__(self, electors: list[LeaseElector]) -> None:
        self.electors = electors
        self.overlap = False

    async def run(self) -> None:
        while True:
            if sum(e.is_leader for e in self.electors) > 1:
                self.overlap = True
            await asyncio.sleep(0.005)


def leaders(*electors: LeaseElector) -> list[str]:
    return [e.identity for e in electors if e.is_leader]


def test_default_lease_name_matches_the_reference_picker() -> None:
    assert default_lease_name("ns", "pool") == "epp-ns-pool.gateway-api-inference-extension.sigs.k8s.io"


def test_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaseElector(ApiClient.__new__(ApiClient), name="x", namespace="y", lease_duration=1, renew_deadline=2, retry_period=0.1)


async def test_two_electors_elect_exactly_one_leader(apiserver, clients, tasks) -> None:
    a, b = await elector(clients, "a"), await elector(clients, "b")
    watch = NeverTwo([a, b])
    tasks(watch.run())
    tasks(a.run())
    tasks(b.run())
    await eventually(lambda: len(leaders(a, b)) == 1)
    first = leaders(a, b)[0]
    await asyncio.sleep(2 * LEASE)  # renewals keep the same leader well past the lease duration
    assert leaders(a, b) == [first]
    assert apiserver.get("leases", "epp-lease")["spec"]["holderIdentity"] == first
    assert not watch.overlap


async def test_a_dead_leader_is_replaced_within_the_lease_duration(apiserver, clients, tasks) -> None:
    a = await elector(clients, "a")
    a_task = tasks(a.run())
    await eventually(lambda: a.is_leader)
    b = await elector(clients, "b")
    tasks(b.run())
    await asyncio.sleep(2 * RETRY)
    assert not b.is_leader
    # The leader dies without a word: cut off first, it cannot hand the lease back.
    apiserver.blocked_tokens.add("a")
    a_task.cancel()
    died = asyncio.get_running_loop().time()
    await eventually(lambda: b.is_leader, timeout=3 * LEASE)
    took = asyncio.get_running_loop().time() - died
    assert took <= LEASE + 3 * RETRY, took
    lease = apiserver.get("leases", "epp-lease")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1


async def test_a_leader_that_stops_cleanly_hands_over_at_once(apiserver, clients, tasks) -> None:
    a, b = await elector(clients, "a"), await elector(clients, "b")
    a_task = tasks(a.run())
    await eventually(lambda: a.is_leader)
    tasks(b.run())
    await asyncio.sleep(2 * RETRY)
    a_task.cancel()
    await asyncio.gather(a_task, return_exceptions=True)
    assert not a.is_leader
    assert apiserver.get("leases", "epp-lease")["spec"]["holderIdentity"] == ""
    stopped = asyncio.get_running_loop().time()
    await eventually(lambda: b.is_leader, timeout=LEASE)
    assert asyncio.get_running_loop().time() - stopped < LEASE / 2


async def test_a_leader_cut_off_from_the_api_steps_down_before_anyone_takes_over(apiserver, clients, tasks) -> None:
    a, b = await elector(clients, "a"), await elector(clients, "b")
    watch = NeverTwo([a, b])
    tasks(watch.run())
    tasks(a.run())
    await eventually(lambda: a.is_leader)
    tasks(b.run())
    await asyncio.sleep(2 * RETRY)
    # Only a's requests fail (a partition): it must step down within its renew deadline, and b must
    # not take over before the lease runs out.
    apiserver.blocked_tokens.add("a")
    await eventually(lambda: not a.is_leader, timeout=RENEW + 3 * RETRY)
    await eventually(lambda: b.is_leader, timeout=2 * LEASE)
    assert not watch.overlap


async def test_api_outage_makes_the_leader_step_down_and_it_recovers(apiserver, clients, tasks) -> None:
    a = await elector(clients, "a")
    tasks(a.run())
    await eventually(lambda: a.is_leader)
    await apiserver.stop()
    await eventually(lambda: not a.is_leader, timeout=RENEW + 5 * RETRY)
    await apiserver.start()
    await eventually(lambda: a.is_leader, timeout=3 * LEASE)
