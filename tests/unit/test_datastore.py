"""The datastore's membership: endpoints that stay keep their state when their spec changes, and the
listeners hear which endpoints changed (a new rank moves a KV-event subscription)."""

from __future__ import annotations

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint, EndpointSpec


def test_a_new_rank_or_group_replaces_the_spec_and_keeps_the_state() -> None:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("p-rank-1", "10.0.0.1", 8001, rank=1, dp_group="g")])
    ep = ds.candidates()[0]
    ds.acquire(ep, 7)
    ds.set_endpoints([EndpointSpec("p-rank-0", "10.0.0.1", 8001, rank=0, dp_group="h")])
    assert ds.candidates()[0] is ep and (ep.spec.rank, ep.spec.dp_group, ep.in_flight) == (0, "h", 1)


def test_spec_listeners_hear_the_changed_endpoints_only() -> None:
    ds = Datastore()
    heard: list[tuple[Endpoint, ...]] = []
    membership: list[tuple[int, int]] = []
    ds.on_spec_change(heard.append)
    ds.on_membership_change(lambda added, removed: membership.append((len(added), len(removed))))
    a, b = EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)
    ds.set_endpoints([a, b])
    assert heard == [] and membership == [(2, 0)]
    ds.set_endpoints([a, EndpointSpec("b", "10.0.0.2", 8000, rank=2)])
    assert [[e.address for e in group] for group in heard] == [["10.0.0.2:8000"]]
    assert membership == [(2, 0)]  # no one joined or left
    ds.set_endpoints([a, EndpointSpec("b", "10.0.0.2", 8000, rank=2)])
    assert len(heard) == 1  # an equal spec is no change
