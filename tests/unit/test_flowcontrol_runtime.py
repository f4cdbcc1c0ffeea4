"""The flow controller (extproc.flowcontrol): ordering, strict priority between bands, fairness between
flows, TTLs, bounds, a client gone while queued, eviction, shutdown, and books that always balance.

The policies are small doubles written here against the contracts (pickers.framework.flowcontrol): an
fcfs key, a strict and a round-robin fairness, a detector reading an in-flight count against a
capacity, a static ceiling. Time is a fake clock; timers are fired by hand: nothing waits for real.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from extproc.flowcontrol.controller import FlowController
from extproc.flowcontrol.eviction import CONFIRMATION_GRACE
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import (
    NO_ENDPOINTS,
    SATURATED,
    SHUTTING_DOWN,
    TTL_EXPIRED,
    RequestError,
)
from pickers.framework.flowcontrol import BandConfig, EvictionItem, FlowControlConfig
from pickers.framework.request import InferenceRequest

# -- the doubles ---------------------------------------------------------------------------------


class Fcfs:
    type = name = "fcfs-double"

    def key(self, item):
        return item.enqueued_at


class ByMaxTokens:  # a different ordering: the shortest job first
    type = name = "max-tokens-double"

    def key(self, item):
        return item.request.max_tokens or 0


class Strict:
    type = name = "strict-double"

    def new_state(self):
        return None

    def pick(self, band):
        return next((q for q in band.queues() if len(q)), None)


class RoundRobin:
    type = name = "rr-double"

    def new_state(self):
        return {"last": None}

    def pick(self, band):
        flows = [f for f in band.flows() if len(band.queue(f.id) or ())]
        if not flows:
            return None
        ids = [f.id for f in flows]
        last = band.policy_state["last"]
        nxt = next((i for i in ids if last is None or i > last), ids[0]) if last not in ids else ids[(ids.index(last) + 1) % len(ids)]
        band.policy_state["last"] = nxt
        return band.queue(nxt)


@dataclass
class Pool:
    """The in-flight count the detector reads; `capacity` requests make it saturated."""

    capacity: int = 1
    in_flight: int = 0
    endpoints: list = field(default_factory=lambda: [Endpoint(EndpointSpec("10.0.0.1:8000", "10.0.0.1", 8000))])


class Detector:
    type = name = "in-flight-double"

    def __init__(self, pool: Pool):
        self.pool = pool

    def saturation(self, endpoints):
        return self.pool.in_flight / self.pool.capacity


class Ceilings:
    type = name = "ceiling-double"

    def __init__(self, by_priority=None):
        self.by_priority = by_priority or {}

    def ceilings(self, saturation, priorities):
        return [self.by_priority.get(p, 1.0) for p in priorities]


class Sheddable:
    type = name = "sheddable-double"

    def accept(self, item):
        return item.priority < 0


class LowestThenNewest:
    type = name = "order-double"

    def key(self, item):
        return (item.priority, -item.dispatched_at)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Timers:
    """call_later by hand: `advance(s)` moves the clock and fires what is due."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.due: list[list] = []

    def __call__(self, delay, cb):
        entry = [self.clock.now + delay, cb, False]
        self.due.append(entry)

        class Handle:
            def cancel(self_inner):
                entry[2] = True

        return Handle()

    def advance(self, seconds):
        self.clock.now += seconds
        for entry in sorted(self.due, key=lambda e: e[0]):
            if entry[0] <= self.clock.now and not entry[2]:
                entry[2] = True
                entry[1]()
        self.due = [e for e in self.due if not e[2]]

    @property
    def pending(self):
        return [e for e in self.due if not e[2]]


def band(priority, *, max_requests=100, max_bytes=0, fairness=None, ordering=None):
    return BandConfig(priority, max_requests, max_bytes, fairness or Strict(), ordering or Fcfs())


def config(pool, *, bands=(), ttl=60.0, no_endpoint_ttl=60.0, max_requests=0, max_bytes=0, eviction=False, ceilings=None,
           fairness=None):  # fmt: skip
    return FlowControlConfig(
        enabled=True, bands=tuple(bands), default_band=band(0, fairness=fairness), default_negative_band=band(-1, fairness=fairness),
        max_requests=max_requests, max_bytes=max_bytes, default_request_ttl=ttl, no_endpoint_request_ttl=no_endpoint_ttl,
        saturation_detector=Detector(pool), usage_limit=Ceilings(ceilings), enable_eviction=eviction,
        eviction_filter=Sheddable() if eviction else None, eviction_order=LowestThenNewest() if eviction else None,
    )  # fmt: skip


class Harness:
    """A controller over a Pool; each request's dispatch takes one in-flight slot and records its id."""

    def __init__(self, **kw):
        self.pool = Pool(capacity=kw.pop("capacity", 1))
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.fc = FlowController(config(self.pool, **kw), lambda: self.pool.endpoints, clock=self.clock, call_later=self.timers)
        self.order: list[str] = []
        self.tasks: dict[str, asyncio.Task] = {}

    def dispatcher(self, rid):
        def dispatch():
            self.pool.in_flight += 1
            self.order.append(rid)
            return rid

        return dispatch

    def submit(self, rid, *, priority=0, flow=None, size=10, max_tokens=None):
        headers = {"x-gateway-inference-fairness-id": flow} if flow else {}
        req = InferenceRequest(request_id=rid, path="/v1/completions", headers=headers, priority=priority, max_tokens=max_tokens)
        self.tasks[rid] = asyncio.ensure_future(self.fc.enqueue_and_wait(req, size, self.dispatcher(rid)))
        return self.tasks[rid]

    def finish(self, n=1):
        self.pool.in_flight -= n
        self.fc.kick()

    def assert_books_empty(self):
        fc = self.fc
        assert fc.count == 0 and fc.byte_size == 0 and not fc._waiting
        for b in fc.bands.values():
            assert b.count == 0 and b.byte_size == 0 and list(b.queues()) == []


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


# -- dispatch ------------------------------------------------------------------------------------


async def test_a_request_with_room_is_dispatched_at_once_without_waiting():
    h = Harness(capacity=2)
    t = h.submit("a")
    await settle()
    assert t.done() and t.result() == "a" and h.pool.in_flight == 1
    h.assert_books_empty()


async def test_a_saturated_pool_holds_requests_and_a_finished_request_lets_the_next_go():
    h = Harness(capacity=1)
    h.submit("a")
    await settle()
    b = h.submit("b")
    await settle()
    assert not b.done() and h.fc.count == 1
    h.finish()
    await settle()
    assert b.result() == "b" and h.order == ["a", "b"]
    h.assert_books_empty()


async def test_within_a_flow_the_ordering_policy_decides_and_ties_go_in_arrival_order():
    h = Harness(capacity=1, bands=[band(0, ordering=ByMaxTokens())])
    h.submit("running")
    await settle()
    for rid, mt in (("long", 500), ("short", 5), ("short-2", 5), ("mid", 50)):
        h.submit(rid, max_tokens=mt)
    await settle()
    for _ in range(4):
        h.finish()
        await settle()
    assert h.order == ["running", "short", "short-2", "mid", "long"]


async def test_a_higher_band_always_dispatches_before_a_lower_one():
    h = Harness(capacity=1)
    h.submit("running")
    await settle()
    h.submit("low-1", priority=-1)
    h.submit("mid-1", priority=0)
    h.submit("high-1", priority=10)
    h.submit("low-2", priority=-1)
    h.submit("high-2", priority=10)
    await settle()
    for _ in range(5):
        h.finish()
        await settle()
    assert h.order == ["running", "high-1", "high-2", "mid-1", "low-1", "low-2"]


async def test_a_blocked_higher_band_blocks_the_lower_bands_too():
    # the high band's ceiling is lower than the low band's: at 0.5 saturation the high band is blocked,
    # and the low band must not take the room (head-of-line blocking, as llm-d)
    h = Harness(capacity=2, ceilings={10: 0.5, 0: 1.0})
    h.submit("running")
    await settle()
    high, low = h.submit("high", priority=10), h.submit("low", priority=0)
    await settle()
    assert not high.done() and not low.done()


async def test_fairness_between_flows_of_a_band_follows_the_fairness_policy():
    h = Harness(capacity=1, fairness=RoundRobin())
    h.submit("running")
    await settle()
    for i in range(3):
        h.submit(f"heavy-{i}", flow="heavy")
    h.submit("light-0", flow="light")
    await settle()
    for _ in range(4):
        h.finish()
        await settle()
    assert h.order == ["running", "heavy-0", "light-0", "heavy-1", "heavy-2"]


async def test_the_flow_is_the_configs_fairness_id_and_views_and_labels_bound_it():
    h = Harness(capacity=1)
    h.submit("running")
    h.submit("a", flow="tenant-a")
    h.submit("long", flow="x" * 10_000)
    h.submit("none")
    await settle()
    flows = {q.flow.id for b in h.fc.bands.values() for q in b.queues()}
    assert flows == {"tenant-a", "x" * 10_000, "default-flow"}  # the resolver's id, as the policies see it
    shown = [f["fairness_id"] for b in h.fc.view()["bands"] for f in b["largest_flows"]]
    assert max(len(f) for f in shown) == 128  # bounded where it is shown
    assert {len(fid) for fid, *_ in h.fc.queue_stats()} >= {10_000}
    assert len(h.fc.metrics.flow_label(next(q.flow for b in h.fc.bands.values() for q in b.queues() if len(q.flow.id) > 128))) == 128
    h.fc.shutdown()
    await settle()
    for t in h.tasks.values():
        t.cancelled() or t.exception()


async def test_an_empty_pool_holds_requests_until_an_endpoint_comes():
    h = Harness(capacity=1)
    eps, h.pool.endpoints = h.pool.endpoints, []
    t = h.submit("a")
    await settle()
    assert not t.done()
    h.pool.endpoints = eps
    h.fc.kick()
    await settle()
    assert t.result() == "a"


async def test_a_failing_pick_fails_only_its_own_request():
    h = Harness(capacity=5)

    def broken():
        raise RuntimeError("boom")

    req = InferenceRequest(request_id="x", path="/", headers={})
    t = asyncio.ensure_future(h.fc.enqueue_and_wait(req, 1, broken))
    ok = h.submit("ok")
    await settle()
    with pytest.raises(RuntimeError):
        t.result()
    assert ok.result() == "ok"
    h.assert_books_empty()


# -- bounds ------------------------------------------------------------------------------------


async def test_a_full_band_refuses_with_429_rejected_saturated():
    h = Harness(capacity=1, bands=[band(0, max_requests=2)])
    h.submit("running")
    h.submit("q1")
    h.submit("q2")
    full = h.submit("q3")
    await settle()
    err = full.exception()
    assert isinstance(err, RequestError) and err.kind is SATURATED and err.kind.status == 429
    assert err.kind.dropped_reason == "rejected-saturated"
    assert h.fc.count == 2


async def test_band_bytes_and_the_global_limits_bound_the_queue_too():
    h = Harness(capacity=1, bands=[band(0, max_bytes=100)], max_requests=3)
    h.submit("running")
    h.submit("big", size=90)
    too_big = h.submit("more", size=20)
    await settle()
    assert too_big.exception().kind is SATURATED
    h.submit("small", size=10)
    h.submit("other-band-1", priority=5)
    over_global = h.submit("other-band-2", priority=5)
    await settle()
    assert over_global.exception().kind is SATURATED and h.fc.count == 3


async def test_a_full_queue_while_the_pool_is_empty_is_503_no_endpoints():
    h = Harness(capacity=1, bands=[band(0, max_requests=1)])
    h.pool.endpoints = []
    h.submit("q1")
    full = h.submit("q2")
    await settle()
    err = full.exception()
    assert err.kind is NO_ENDPOINTS and err.kind.status == 503 and err.kind.dropped_reason == "rejected-no-endpoints"


# -- time to live ------------------------------------------------------------------------------


async def test_a_request_waiting_past_its_ttl_gets_429_ttl_expired_and_one_timer_is_armed():
    h = Harness(capacity=1, ttl=5.0)
    h.submit("running")
    await settle()
    first, second = h.submit("a"), h.submit("b")
    await settle()
    assert len(h.timers.pending) == 1  # one timer for the oldest, not one per request
    h.timers.advance(2.0)
    h.clock.now += 0  # b arrived at the same fake time; both expire together at +5
    h.timers.advance(3.0)
    await settle()
    for t in (first, second):
        err = t.exception()
        assert err.kind is TTL_EXPIRED and err.kind.status == 429 and err.kind.dropped_reason == "rejected-ttl-expired"
    h.assert_books_empty()
    assert h.timers.pending == []


async def test_the_timer_re_arms_for_the_next_oldest_request():
    h = Harness(capacity=1, ttl=5.0)
    h.submit("running")
    await settle()
    a = h.submit("a")
    await settle()
    h.clock.now += 3
    b = h.submit("b")
    await settle()
    h.timers.advance(2.0)
    await settle()
    assert a.done() and not b.done()
    h.timers.advance(3.0)
    await settle()
    assert b.exception().kind is TTL_EXPIRED


async def test_a_ttl_of_zero_waits_until_the_client_goes_away():
    h = Harness(capacity=1, ttl=0.0)
    h.submit("running")
    t = h.submit("a")
    await settle()
    assert h.timers.pending == []
    h.timers.advance(3600)
    await settle()
    assert not t.done()
    t.cancel()
    await settle()
    h.assert_books_empty()


async def test_waiting_on_an_empty_pool_uses_the_no_endpoint_ttl_and_gives_503():
    h = Harness(capacity=1, ttl=60.0, no_endpoint_ttl=2.0)
    h.pool.endpoints = []
    t = h.submit("a")
    await settle()
    h.timers.advance(2.0)
    await settle()
    err = t.exception()
    assert err.kind is NO_ENDPOINTS and err.kind.dropped_reason == "rejected-no-endpoints"


async def test_an_endpoint_appearing_starts_the_ttl_afresh():
    h = Harness(capacity=1, ttl=5.0, no_endpoint_ttl=5.0)
    eps, h.pool.endpoints = h.pool.endpoints, []
    h.pool.in_flight = 1  # saturated once endpoints come
    t = h.submit("a")
    await settle()
    h.clock.now += 4
    h.pool.endpoints = eps
    h.fc.kick()
    await settle()
    h.timers.advance(2.0)  # 6 s after it queued, 2 s after the pool came back
    await settle()
    assert not t.done()
    h.timers.advance(3.0)
    await settle()
    assert t.exception().kind is TTL_EXPIRED


# -- clients that go away, shutdown, the books -----------------------------------------------------


async def test_a_client_that_disconnects_while_queued_is_removed_at_once():
    h = Harness(capacity=1)
    h.submit("running")
    gone, stays = h.submit("gone", flow="a", size=7), h.submit("stays", flow="b", size=3)
    await settle()
    assert h.fc.count == 2 and h.fc.byte_size == 10
    gone.cancel()
    await settle()
    assert h.fc.count == 1 and h.fc.byte_size == 3
    assert [q.flow.id for b in h.fc.bands.values() for q in b.queues()] == ["b"]  # the emptied flow is gone
    h.finish()
    await settle()
    assert stays.result() == "stays" and "gone" not in h.order
    assert h.fc.metrics.totals[("EvictedContextCancelled", 0)] == 1
    h.assert_books_empty()


async def test_shutdown_answers_every_waiting_request_with_503_and_refuses_new_ones():
    h = Harness(capacity=1)
    h.submit("running")
    waiting = [h.submit(f"w{i}", priority=p) for i, p in enumerate((5, 0, -1))]
    await settle()
    h.fc.shutdown()
    await settle()
    for t in waiting:
        err = t.exception()
        assert err.kind is SHUTTING_DOWN and err.kind.status == 503 and err.kind.dropped_reason == "rejected-shutting-down"
    late = h.submit("late")
    await settle()
    assert late.exception().kind is SHUTTING_DOWN
    h.assert_books_empty()


async def test_nothing_leaks_after_a_mixed_storm():
    h = Harness(capacity=3, bands=[band(0, max_requests=20)], ttl=5.0)
    tasks = []
    for i in range(60):
        tasks.append(h.submit(f"r{i}", priority=(i % 3) - 1, flow=f"tenant-{i % 4}", size=i))
    await settle()
    for t in tasks[5:15]:
        t.cancel()
    for _ in range(10):
        h.finish()
        await settle()
    h.timers.advance(10)
    await settle()
    assert all(t.done() for t in tasks)
    await asyncio.gather(*tasks, return_exceptions=True)  # every outcome read: none left for the garbage collector
    h.assert_books_empty()
    assert sum(h.fc.metrics.totals.values()) == 60
    assert h.fc.queue_stats() == []


# -- eviction ------------------------------------------------------------------------------------


class Evictions:
    """In-flight requests of a harness, tracked as the Director tracks them."""

    def __init__(self, h: Harness):
        self.h = h
        self.evicted: list[str] = []

    def dispatch_tracked(self, rid, priority):
        h = self.h
        req = InferenceRequest(request_id=rid, path="/", headers={}, priority=priority)

        def evict():
            self.evicted.append(rid)

        h.pool.in_flight += 1
        h.fc.track(EvictionItem(rid, priority, h.clock.now, "10.0.0.1:8000", req, evict), rid)


async def test_a_blocked_higher_band_evicts_in_flight_sheddable_requests_newest_first():
    h = Harness(capacity=2, eviction=True)
    ev = Evictions(h)
    ev.dispatch_tracked("shed-old", -1)
    h.clock.now += 1
    ev.dispatch_tracked("shed-new", -1)
    high = h.submit("high", priority=5)
    await settle()
    # saturation 1.0, ceiling 1.0: deficit 0 -> one eviction (at least one, at most two)
    assert ev.evicted == ["shed-new"] and not high.done()
    # the evicted stream ends: its slot frees and the high request goes
    h.pool.in_flight -= 1
    h.fc.finished("shed-new")
    await settle()
    assert high.result() == "high"


async def test_eviction_never_touches_requests_that_are_not_sheddable_or_not_lower():
    h = Harness(capacity=2, eviction=True)
    ev = Evictions(h)
    ev.dispatch_tracked("important", 0)
    ev.dispatch_tracked("shed", -1)
    waiting_shed = h.submit("also-sheddable", priority=-1)
    await settle()
    assert ev.evicted == []  # a sheddable demand never evicts its own band
    assert not waiting_shed.done()


async def test_eviction_is_paced_one_decision_until_confirmed_and_a_grace_after():
    h = Harness(capacity=3, eviction=True)
    ev = Evictions(h)
    for i in range(3):
        ev.dispatch_tracked(f"shed-{i}", -1)
        h.clock.now += 1
    h.submit("high-1", priority=5)
    await settle()
    assert ev.evicted == ["shed-2"]
    h.fc.kick()
    await settle()
    assert ev.evicted == ["shed-2"]  # unconfirmed: no second decision
    h.fc.finished("shed-2")  # confirmed, but the pool's gauge has not moved yet (in_flight unchanged)
    await settle()
    assert ev.evicted == ["shed-2"]  # within the grace
    h.timers.advance(CONFIRMATION_GRACE)
    await settle()
    assert ev.evicted == ["shed-2", "shed-1"]
    assert h.fc.metrics.revocations == {"confirmed": 1}


async def test_with_eviction_off_nothing_is_tracked():
    h = Harness(capacity=1)
    ev = Evictions(h)
    ev.dispatch_tracked("shed", -1)
    h.submit("high", priority=5)
    await settle()
    assert ev.evicted == [] and h.fc.reclaimer is None


# -- views ---------------------------------------------------------------------------------------


async def test_the_view_and_the_gauges_show_bands_and_flows():
    h = Harness(capacity=1)
    h.submit("running")
    h.submit("a", flow="tenant-a", size=5)
    h.submit("b", flow="tenant-a", size=5)
    h.submit("c", priority=-1, size=1)
    await settle()
    view = h.fc.view()
    assert view["requests"] == 3 and view["bytes"] == 11
    by_priority = {b["priority"]: b for b in view["bands"]}
    assert by_priority[0]["largest_flows"][0]["fairness_id"] == "tenant-a" and by_priority[0]["largest_flows"][0]["requests"] == 2
    assert sorted(h.fc.queue_stats()) == [("default-flow", -1, 1, 1), ("tenant-a", 0, 2, 10)]
    assert [b["priority"] for b in view["bands"]] == [0, -1]  # descending


async def test_the_metrics_use_llm_ds_names_and_bound_the_fairness_ids():
    from extproc.observability.metrics import EppMetrics

    h = Harness(capacity=1)
    h.fc.metrics.queues = h.fc.queue_stats
    m = EppMetrics()
    m.flow_control = h.fc.metrics
    h.submit("running")
    for i in range(150):
        h.submit(f"r{i}", flow=f"tenant-{i}")
    await settle()
    names = m.names()
    for name in ("llm_d_epp_flow_control_queue_size", "llm_d_epp_flow_control_queue_bytes", "llm_d_epp_flow_control_requests_total",
                 "llm_d_epp_flow_control_request_queue_duration_seconds_bucket", "llm_d_epp_flow_control_pool_saturation"):  # fmt: skip
        assert name in names
    text = m.exposition().decode()
    sizes = [line for line in text.splitlines() if line.startswith("llm_d_epp_flow_control_queue_size{")]
    assert len(sizes) <= 101 and any('fairness_id="other"' in line for line in sizes)
    h.fc.shutdown()
    await settle()
    for t in h.tasks.values():
        t.cancelled() or t.exception()
