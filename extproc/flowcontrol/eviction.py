"""In-flight eviction (`enableEviction`): when a band with waiting requests is blocked by saturation,
end in-flight requests of lower priority to make room, as llm-d's reclamation controller does.

Sizing: the deficit `saturation - ceiling` of the blocked band, over a mean footprint per in-flight
request (`saturation / in-flight`), at least one and at most `MAX_REVOCATIONS` per decision and never
a victim at or above the blocked band's priority. Victims are the in-flight requests the eviction
filter accepts (decided when they are dispatched), smallest eviction-order key first. Pacing is
stop-and-wait: no new decision while an eviction is unconfirmed (its stream has not ended, up to
`CONFIRMATION_TIMEOUT`) or within `CONFIRMATION_GRACE` after the last confirmation, so the saturation
signal has absorbed one decision before the next is made. An evicted request's stream ends with 429
and `x-llm-d-request-dropped-reason: evicted`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from extproc.observability.metrics import FlowControlMetrics
from pickers.framework.flowcontrol import EvictionItem, FlowControlConfig

if TYPE_CHECKING:
    from extproc.flowcontrol.queues import Band

MAX_REVOCATIONS = 2  # llm-d's defaultMaxRevocationsPerDecision
CONFIRMATION_GRACE = 0.5  # seconds; llm-d's default for scraped saturation signals
CONFIRMATION_TIMEOUT = 10.0  # seconds an unconfirmed eviction may hold the next decision back


class Reclaimer:
    def __init__(
        self, config: FlowControlConfig, *, clock: Callable[[], float], wake: Callable[[float], None], metrics: FlowControlMetrics
    ) -> None:
        self.filter = config.eviction_filter
        self.order = config.eviction_order
        self.clock = clock
        self.wake = wake  # ask for a dispatch pass after this many seconds
        self.metrics = metrics
        self.in_flight: dict[object, EvictionItem] = {}
        self.evictable: dict[object, EvictionItem] = {}
        self.outstanding: dict[object, float] = {}  # evicted, stream not ended yet: issued at
        self.cooling_until = 0.0

    def track(self, item: EvictionItem, key: object) -> None:
        self.in_flight[key] = item
        if self.filter is None or self.filter.accept(item):
            self.evictable[key] = item

    def untrack(self, key: object) -> None:
        if self.in_flight.pop(key, None) is None:
            return
        self.evictable.pop(key, None)
        if self.outstanding.pop(key, None) is not None:
            self.metrics.revocation_done("confirmed")
            self.cooling_until = self.clock() + CONFIRMATION_GRACE
            self.wake(CONFIRMATION_GRACE)

    def gate_open(self, now: float) -> bool:
        for key, issued in list(self.outstanding.items()):
            if now - issued >= CONFIRMATION_TIMEOUT:
                del self.outstanding[key]
                self.metrics.revocation_done("timed_out")
        return not self.outstanding and now >= self.cooling_until

    def maybe_reclaim(self, saturation: float, priorities: Sequence[int], ceilings: Sequence[float], blocked: int,
                      bands: Mapping[int, Band]) -> int:  # fmt: skip
        """Band `blocked` (an index into `priorities`, descending) stopped the pass: evict for the first
        blocked band at or below it that has waiting requests. Returns how many were evicted."""
        if not self.evictable or not self.gate_open(self.clock()):
            return 0
        victim_priority = min(v.priority for v in self.evictable.values())
        for j in range(blocked, len(priorities)):
            if priorities[j] <= victim_priority:
                return 0
            if ceilings[j] <= 0 or saturation < ceilings[j]:
                continue  # a zero ceiling never dispatches, whatever is freed; an open band needs nothing
            if bands[priorities[j]].count:
                return self._reclaim(saturation, ceilings[j], priorities[j])
        return 0

    def _reclaim(self, saturation: float, ceiling: float, demand_priority: int) -> int:
        credit = saturation / len(self.in_flight)
        if not credit > 0 or math.isinf(credit):
            return 0
        n = min(MAX_REVOCATIONS, max(1, math.ceil((saturation - ceiling) / credit)))
        candidates = [(k, v) for k, v in self.evictable.items() if v.priority < demand_priority]
        order = self.order
        key: Callable[[tuple[object, EvictionItem]], Any] = (
            (lambda kv: order.key(kv[1])) if order is not None else (lambda kv: (kv[1].priority, -kv[1].dispatched_at))
        )
        now = self.clock()
        victims = heapq.nsmallest(n, candidates, key=key)
        for k, v in victims:
            del self.evictable[k]
            self.outstanding[k] = now
            v.evict()
        if victims:
            self.metrics.revocations_issued(demand_priority, len(victims))
            self.wake(CONFIRMATION_TIMEOUT)
        return len(victims)

    def view(self, now: float) -> dict[str, Any]:
        return {
            "in_flight": len(self.in_flight), "evictable": len(self.evictable), "unconfirmed": len(self.outstanding),
            "gate_open": not self.outstanding and now >= self.cooling_until,
            "filter": getattr(self.filter, "type", None), "order": getattr(self.order, "type", None),
        }  # fmt: skip
