"""The datastore's membership: endpoints that stay keep their state when their spec changes, and the
listeners hear which endpoints changed (a new rank moves a KV-event subscription)."""

from __future__ import annotations

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics


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


def _gathered(endpoints: object) -> dict[str, list[float]]:
    eps = list(endpoints)  # type: ignore[call-overload]
    return {
        "waiting": [float(e.metrics.waiting) for e in eps],
        "running": [float(e.metrics.running) for e in eps],
        "kv_usage": [float(e.metrics.kv_usage) for e in eps],
        "in_flight": [float(e.in_flight) for e in eps],
        "in_flight_prefill_tokens": [float(e.in_flight_prefill_tokens) for e in eps],
    }


def _columns(endpoints: object) -> dict[str, list[float]]:
    from pickers.framework.columns import EndpointColumns

    c = EndpointColumns(endpoints)  # type: ignore[arg-type]
    return {name: getattr(c, name)().tolist() for name in ("waiting", "running", "kv_usage", "in_flight", "in_flight_prefill_tokens")}


def test_the_pools_live_columns_follow_every_write_and_every_membership() -> None:
    """A pick over the whole pool copies the datastore's live columns instead of gathering them: after
    any mix of scrapes, scrape errors, the request path's counts, direct writes and membership changes
    they hold what a gather would read, and the pool's count of failing endpoints is right."""
    import random

    from pickers.framework.columns import EndpointColumns, failing_in
    from pickers.framework.endpoint import Metrics

    rng = random.Random(3)
    ds = Datastore()
    specs = [EndpointSpec(f"e{i}", f"10.0.0.{i}", 8000) for i in range(12)]
    ds.set_endpoints(specs[:8])
    for step in range(600):
        pool = ds.candidates()
        ep = pool[rng.randrange(len(pool))]
        op = rng.randrange(9)
        if op == 0:
            ds.update_metrics(ep.address, Metrics(waiting=rng.randrange(50), running=rng.randrange(9), kv_usage=rng.random()))
        elif op == 1:
            ds.acquire(ep, rng.randrange(900), rng.randrange(500), requests=rng.randrange(1, 3))
        elif op == 2:
            ds.prefill_done(ep, rng.randrange(600))
        elif op == 3:
            ds.release(ep, rng.randrange(900), requests=rng.randrange(1, 3))
        elif op == 4:  # written by hand, as a test or a plugin might
            ep.in_flight, ep.in_flight_prefill_tokens = rng.randrange(7), rng.randrange(3000)
        elif op == 5:
            ep.metrics = Metrics(waiting=rng.randrange(5), kv_usage=0.5)
        elif op == 6:
            ds.record_scrape_error(ep.address, "connection refused")
        elif op == 7:
            ep.scrape_error = rng.choice([None, "timed out"])
        else:  # membership: some leave, some join, the rest keep their state
            ds.set_endpoints(rng.sample(specs, rng.randrange(1, len(specs))))
        pool = ds.candidates()
        assert EndpointColumns(pool)._live is not None, step
        assert _columns(pool) == _gathered(pool), step
        failing = sum(e.scrape_error is not None for e in pool)
        assert (EndpointColumns(pool)._live.failing, failing_in(pool)) == (failing, failing > 0), step  # type: ignore[union-attr]

    pool = ds.candidates()
    subset = list(pool[:3])  # not the pool itself (a filter's or a subset hint's): gathered, as before
    assert EndpointColumns(subset)._live is None and _columns(subset) == _gathered(subset)
    assert failing_in(subset) == any(e.scrape_error is not None for e in subset)
    ds.update_metrics(pool[0].address, Metrics(waiting=41))
    assert _columns(subset)["waiting"][0] == 41.0


def test_an_endpoint_that_left_the_pool_no_longer_writes_its_columns() -> None:
    from pickers.framework.columns import EndpointColumns

    ds = Datastore()
    a, b = EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)
    ds.set_endpoints([a, b])
    ep_a, ep_b = ds.candidates()
    old = EndpointColumns(ds.candidates())._live
    ds.set_endpoints([b])
    assert ep_a._columns is None and ep_b._columns is not old
    ds.release(ep_a, 0)  # a request that ends after its endpoint left (Director.finish does this)
    ep_a.in_flight = 5
    assert _columns(ds.candidates()) == _gathered(ds.candidates()) == _gathered([ep_b])


def test_columns_held_across_a_membership_change_read_what_a_gather_reads() -> None:
    """The scheduler keeps its columns per candidates sequence: columns of a pool that was (its
    endpoints now write into the new pool's arrays) must not read the old arrays."""
    from pickers.framework.columns import EndpointColumns

    ds = Datastore()
    specs = [EndpointSpec(f"e{i}", f"10.0.1.{i}", 8000) for i in range(6)]
    ds.set_endpoints(specs[:4])
    old_pool = ds.candidates()
    held = EndpointColumns(old_pool)
    assert held.in_flight().tolist() == [0.0] * 4
    ds.set_endpoints(specs)  # everyone who stays writes into the new pool's columns from now on
    ds.acquire(old_pool[1], 10, 5)
    ds.update_metrics(old_pool[2].address, Metrics(waiting=7))
    assert _columns(old_pool) == _gathered(old_pool)
    assert held.in_flight().tolist() == [0.0, 1.0, 0.0, 0.0] and held.waiting().tolist() == [0.0, 0.0, 7.0, 0.0]
    assert EndpointColumns(ds.candidates())._live is not None and _columns(ds.candidates()) == _gathered(ds.candidates())
