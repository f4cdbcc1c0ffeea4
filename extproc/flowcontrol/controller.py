"""The flow controller: holds parsed requests while the pool is saturated and lets them go, one at a
time, when it has room (llm-d's FlowController, in one event loop).

A request's path calls `enqueue_and_wait(request, bytes, dispatch)` and awaits it; its ext_proc stream
stays open meanwhile. The controller puts it in its flow's queue (its fairness id within its priority
band), bounded per band and overall in requests and bytes. A dispatch pass runs when capacity may have
freed (`kick`: a request ended or sent its first byte, a scrape, the endpoints changed) and on each
arrival; it walks the bands from the highest priority down and stops at the first band whose ceiling
(the usage-limit policy's, on the detector's saturation) the pool has reached: that band and every band
below it wait (head-of-line blocking, so lower priorities cannot add to what blocks a higher one). In a
band that may dispatch, the fairness policy picks the flow and the ordering policy the item. Dispatching
runs `dispatch()` (the pick) synchronously, so the in-flight counts it adds are seen by the next
saturation reading in the same pass. No busy loop: between events the only timer is the next expiry.

Outcomes (llm-d's, with its statuses): a full queue is 429 `rejected-saturated` (503
`rejected-no-endpoints` while the pool is empty); a request that waits past its TTL is 429
`rejected-ttl-expired` (503 `rejected-no-endpoints` when the pool is empty; while it is, the budget is
`no_endpoint_request_ttl`, and each change between empty and not starts the budget afresh); shutdown is
503 `rejected-shutting-down`; a client that goes away (the waiter is cancelled) leaves its queue at once.
Eviction (extproc.flowcontrol.eviction) ends in-flight sheddable requests when a higher band is blocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from extproc.flowcontrol.eviction import Reclaimer
from extproc.flowcontrol.queues import Band, Item
from extproc.observability import bounds
from extproc.observability.metrics import FlowControlMetrics
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import (
    NO_ENDPOINTS,
    SATURATED,
    SHUTTING_DOWN,
    TTL_EXPIRED,
    RequestError,
)
from pickers.framework.flowcontrol import (
    BandConfig,
    EvictionItem,
    FlowControlConfig,
    FlowKey,
)
from pickers.framework.request import InferenceRequest

T = TypeVar("T")
Timer = Callable[[float, Callable[[], None]], asyncio.TimerHandle]

# llm-d's QueueOutcome names (the `outcome` label of llm_d_epp_flow_control_requests_total)
DISPATCHED = "Dispatched"
REJECTED_CAPACITY = "RejectedCapacity"
REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
REJECTED_OTHER = "RejectedOther"
EVICTED_TTL = "EvictedTTL"
EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
EVICTED_CANCELLED = "EvictedContextCancelled"
EVICTED_OTHER = "EvictedOther"


class FlowController:
    def __init__(
        self,
        config: FlowControlConfig,
        endpoints: Callable[[], Sequence[Endpoint]],
        *,
        metrics: FlowControlMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        call_soon: Callable[[Callable[[], None]], object] | None = None,
        call_later: Timer | None = None,
    ) -> None:
        self.config = config
        self.endpoints = endpoints
        self.metrics = metrics or FlowControlMetrics()
        self.clock = clock
        self._call_soon = call_soon or (lambda cb: asyncio.get_running_loop().call_soon(cb))
        self._call_later: Timer = call_later or (lambda d, cb: asyncio.get_running_loop().call_later(d, cb))
        self.bands: dict[int, Band] = {}
        self._priorities: list[int] = []  # descending
        for b in config.bands:
            self._add_band(b)
        self._waiting: dict[int, Item] = {}  # by arrival: the oldest first (every item has the same TTL)
        self._seq = 0
        self.count = 0
        self.byte_size = 0
        self.closed = False
        self._pass_due = False
        self._in_pass = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._empty = False  # the pool had no endpoint at the last look
        self._empty_since = clock()  # when that last changed
        self.saturation = 0.0  # at the last pass
        self.reclaimer = (
            Reclaimer(config, clock=clock, wake=self._wake_at, metrics=self.metrics) if config.enable_eviction else None
        )

    # -- the request path -------------------------------------------------------------------------
    async def enqueue_and_wait(self, request: InferenceRequest, byte_size: int, dispatch: Callable[[], T],
                               *, received_at: float | None = None) -> T:  # fmt: skip
        """Hold `request` until its band may dispatch, then return what `dispatch()` (the pick) returns.
        Raises RequestError (429/503 with a dropped reason) when refused or dropped; cancelling the
        caller (the client went away) removes the request at once."""
        # the fairness id as the config resolves it (header, agent-identity, default-flow): the same the
        # fairness policies (program-aware-fairness) see; bounded where it is shown (labels, views)
        flow = FlowKey(request.priority, self.config.fairness_id(request))
        if self.closed:
            self.metrics.outcome(flow, REJECTED_OTHER, 0.0)
            raise RequestError(SHUTTING_DOWN, "the EPP is shutting down: retry on another replica")
        band = self.bands.get(flow.priority) or self._add_band(self.config.band(flow.priority))  # cached per priority
        now = self.clock()
        self._look_at_pool(self.endpoints(), now)
        c = self.config
        fits = (c.max_requests <= 0 or self.count + 1 <= c.max_requests) and (c.max_bytes <= 0 or self.byte_size + byte_size <= c.max_bytes)
        if not (fits and band.fits(byte_size)):
            if self._empty:
                self.metrics.outcome(flow, REJECTED_NO_ENDPOINTS, 0.0)
                raise RequestError(NO_ENDPOINTS, "no endpoints available and the flow-control queue is full")
            self.metrics.outcome(flow, REJECTED_CAPACITY, 0.0)
            raise RequestError(SATURATED, f"the flow-control queue of priority {flow.priority} is full")
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._seq += 1
        item = Item(request.request_id, flow, request, byte_size, now if received_at is None else received_at, now,
                    c.default_request_ttl, self._seq, dispatch, waiter)  # fmt: skip
        band.push(item)
        self._waiting[item.seq] = item
        self.count += 1
        self.byte_size += byte_size
        waiter.add_done_callback(lambda w: self._cancelled(item) if w.cancelled() else None)
        self.run_pass()  # often dispatches it at once: then the await below does not wait
        if item.queued:
            self._arm_timer()
        return await waiter

    def kick(self) -> None:
        """Capacity may have freed: run a dispatch pass soon (several kicks before it run one pass)."""
        if not self._pass_due and self.count:
            self._pass_due = True
            self._call_soon(self.run_pass)

    def track(self, item: EvictionItem, key: object) -> None:
        """A dispatched request is in flight (eviction only): `key` is what `finished` is called with."""
        if self.reclaimer is not None:
            self.reclaimer.track(item, key)

    def finished(self, key: object) -> None:
        """A dispatched request ended (served, aborted or evicted)."""
        if self.reclaimer is not None:
            self.reclaimer.untrack(key)
        self.kick()

    # -- dispatch -------------------------------------------------------------------------------
    def run_pass(self) -> int:
        """Dispatch while the bands' ceilings allow; returns how many went."""
        self._pass_due = False
        if self._in_pass or not self.count:
            return 0
        self._in_pass = True
        sent = 0
        try:
            detector, limits = self.config.saturation_detector, self.config.usage_limit
            while self.count:
                eps = self.endpoints()
                self._look_at_pool(eps, self.clock())
                if not eps:
                    break  # held while the pool is empty (the no-endpoint TTL bounds the wait)
                sat = self.saturation = detector.saturation(eps)
                priorities = self._priorities
                ceilings = limits.ceilings(sat, priorities)
                item = None
                for i, priority in enumerate(priorities):
                    if sat >= ceilings[i]:
                        if self.reclaimer is not None:
                            self.reclaimer.maybe_reclaim(sat, priorities, ceilings, i, self.bands)
                        break
                    item = self.bands[priority].pick()
                    if item is not None:
                        break
                if item is None:
                    break
                if item.waiter.done():  # cancelled, its callback not run yet: the client is gone
                    self._cancelled(item)
                    continue
                self._dispatch(item)
                sent += 1
        finally:
            self._in_pass = False
        self.metrics.pool_saturation = self.saturation
        return sent

    def _dispatch(self, item: Item) -> None:
        self._take(item)
        waited = self.clock() - item.enqueued_at
        self.metrics.outcome(item.flow, DISPATCHED, waited)
        try:
            result = item.dispatch()
        except Exception as e:  # noqa: BLE001 (the pick's own failure: that request's, never the pass's)
            item.waiter.set_exception(e)
        else:
            item.waiter.set_result(result)

    def _take(self, item: Item) -> None:
        self.bands[item.flow.priority].remove(item)
        del self._waiting[item.seq]
        self.count -= 1
        self.byte_size -= item.byte_size

    def _drop(self, item: Item, outcome: str, error: RequestError) -> None:
        self._take(item)
        self.metrics.outcome(item.flow, outcome, self.clock() - item.enqueued_at)
        if not item.waiter.done():
            item.waiter.set_exception(error)

    def _cancelled(self, item: Item) -> None:
        if item.queued:  # the client went away while it waited
            self._take(item)
            self.metrics.outcome(item.flow, EVICTED_CANCELLED, self.clock() - item.enqueued_at)

    # -- time to live ---------------------------------------------------------------------------
    def _look_at_pool(self, eps: Sequence[Endpoint], now: float) -> None:
        empty = not eps
        if empty != self._empty:
            self._empty, self._empty_since = empty, now
            if self.count:
                self._arm_timer(force=True)  # each regime starts the budget afresh

    def _budget(self, item: Item) -> float:
        return self.config.no_endpoint_request_ttl if self._empty else item.ttl

    def _deadline(self, item: Item) -> float:
        return max(item.enqueued_at, self._empty_since) + self._budget(item)

    def _arm_timer(self, force: bool = False) -> None:
        oldest = next(iter(self._waiting.values()), None)
        if oldest is None or self._budget(oldest) <= 0:
            return
        at = self._deadline(oldest)
        if self._timer is not None:
            if not force and self._timer_at <= at:
                return  # it fires first; it re-arms for what is left then
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._call_later(max(0.0, at - self.clock()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock()
        self._look_at_pool(self.endpoints(), now)
        while self._waiting:
            item = next(iter(self._waiting.values()))
            if self._budget(item) <= 0 or self._deadline(item) > now:
                break
            if self._empty:
                self._drop(item, EVICTED_NO_ENDPOINTS, RequestError(NO_ENDPOINTS, "no endpoints became available while the request waited in the queue"))
            else:
                self._drop(item, EVICTED_TTL, RequestError(TTL_EXPIRED, f"request timed out in the flow-control queue after {item.ttl:g} s"))
        self._arm_timer()

    def _wake_at(self, delay: float) -> None:
        self._call_later(delay, self.kick)

    # -- bands ----------------------------------------------------------------------------------
    def _add_band(self, config: BandConfig) -> Band:
        band = self.bands[config.priority] = Band(config)
        self._priorities = sorted(self.bands, reverse=True)
        return band

    # -- config reload --------------------------------------------------------------------------
    def reconfigure(self, config: FlowControlConfig) -> None:
        """A reloaded flowControl section (extproc.server.runner's hook). Bounds, policies, the detector,
        the usage limit, eviction and the fairness-id resolver apply from the next arrival and the next
        dispatch pass. Queued requests keep their place: their flow, their band, and the order within
        their flow (a flow's queue keeps the ordering it was made with until it empties; flows made
        after the reload use the new one). Bounds that shrink below what is held refuse new arrivals
        until it drains; nothing queued is dropped. The TTLs are section-wide: a new defaultRequestTTL
        applies to the requests already queued too, measured from when each was queued."""
        self.config = config
        for priority, band in self.bands.items():
            band.reconfigure(config.band(priority))
        for b in config.bands:
            if b.priority not in self.bands:
                self._add_band(b)
        for item in self._waiting.values():
            item.ttl = config.default_request_ttl
        if not config.enable_eviction:
            self.reclaimer = None  # requests in flight are no longer evicted
        elif self.reclaimer is None:
            self.reclaimer = Reclaimer(config, clock=self.clock, wake=self._wake_at, metrics=self.metrics)  # tracks from now on
        else:
            self.reclaimer.filter, self.reclaimer.order = config.eviction_filter, config.eviction_order
        if self.count:
            self._arm_timer(force=True)
            self.kick()  # a higher ceiling or a larger pool may let some go now

    # -- shutdown and views ---------------------------------------------------------------------
    def shutdown(self) -> None:
        """Refuse new requests and answer every waiting one with 503 `rejected-shutting-down`."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for item in list(self._waiting.values()):
            self._drop(item, EVICTED_OTHER, RequestError(SHUTTING_DOWN, "the EPP is shutting down: retry on another replica"))

    def queue_stats(self) -> list[tuple[str, int, int, int]]:
        """(fairness id, priority, requests, bytes) per flow that holds requests: the queue gauges."""
        return [(q.flow.id, q.flow.priority, q.count, q.byte_size) for band in self.bands.values() for q in band.queues()]

    def view(self, flows_shown: int = 20) -> dict[str, Any]:
        """/debug/flowcontrol: the bands, their largest flows, the totals and the outcome counts."""
        now = self.clock()
        c = self.config
        bands = []
        for p in self._priorities:
            band = self.bands[p]
            queues = sorted(band.queues(), key=lambda q: -q.count)
            flows = []
            for q in queues[:flows_shown]:
                head = q.head()
                flows.append({"fairness_id": bounds.fairness_id(q.flow.id), "requests": q.count, "bytes": q.byte_size,
                              "head_wait_s": round(now - head.enqueued_at, 3) if head is not None else None})  # fmt: skip
            bands.append({
                "priority": p, "requests": band.count, "bytes": band.byte_size, "max_requests": band.config.max_requests,
                "max_bytes": band.config.max_bytes, "fairness": _plugin(band.config.fairness),
                "ordering": _plugin(band.config.ordering), "flows": len(queues), "largest_flows": flows,
            })  # fmt: skip
        out: dict[str, Any] = {
            "enabled": True, "closed": self.closed, "requests": self.count, "bytes": self.byte_size,
            "max_requests": c.max_requests, "max_bytes": c.max_bytes, "default_request_ttl_s": c.default_request_ttl,
            "no_endpoint_request_ttl_s": c.no_endpoint_request_ttl, "pool_empty": self._empty,
            "saturation": round(self.saturation, 4), "saturation_detector": _plugin(c.saturation_detector),
            "usage_limit_policy": _plugin(c.usage_limit), "bands": bands,
            "outcomes": {f"{k[0]}:{k[1]}": n for k, n in sorted(self.metrics.totals.items())},
        }  # fmt: skip
        if self.reclaimer is not None:
            out["eviction"] = self.reclaimer.view(now)
        return out


def _plugin(p: object) -> dict[str, str]:
    return {"type": str(getattr(p, "type", type(p).__name__)), "name": str(getattr(p, "name", ""))}
