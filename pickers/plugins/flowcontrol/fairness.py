"""Fairness between the flows of one band (llm-d's), neither with parameters.

global-strict-fairness-policy (the default): the flow whose head is best by the band's ordering
policy, across all flows, as if the band were one queue (no fairness; ties: the first flow seen).
round-robin-fairness-policy: the next non-empty flow after the one served last, flows sorted by id;
the cursor is per band (new_state). The runtime removes a flow whose queue empties (llm-d keeps it,
empty, until its GC), so when the flow served last is gone the turn goes on from the next id after
it, as it would past llm-d's empty flow (llm-d restarts from the first only when its flow was GC'd).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pickers.framework.flowcontrol import FlowKey, FlowQueue, PriorityBand
from pickers.plugins.base import Plugin


class GlobalStrictFairness(Plugin):
    type = "global-strict-fairness-policy"

    def new_state(self) -> None:
        return None

    def pick(self, band: PriorityBand) -> FlowQueue | None:
        key = band.ordering.key
        best: FlowQueue | None = None
        best_key = None
        for queue in band.queues():
            head = queue.head()
            if head is None:
                continue
            k = key(head)
            if best is None or k < best_key:
                best, best_key = queue, k
        return best


@dataclass(slots=True)
class RoundRobinCursor:
    last: FlowKey | None = None


class RoundRobinFairness(Plugin):
    type = "round-robin-fairness-policy"

    def new_state(self) -> RoundRobinCursor:
        return RoundRobinCursor()

    def pick(self, band: PriorityBand) -> FlowQueue | None:
        cursor: RoundRobinCursor = band.policy_state
        keys = sorted(band.flows())  # FlowKey orders by (priority, id); one band has one priority
        if not keys:
            cursor.last = None
            return None
        n = len(keys)
        # the first flow after the one served last (present or gone: the turn goes on past it)
        start = bisect.bisect_right(keys, cursor.last) % n if cursor.last is not None else 0
        for i in range(n):
            k = keys[(start + i) % n]
            queue = band.queue(k.id)
            if queue is not None and len(queue) > 0:
                cursor.last = k
                return queue
        cursor.last = None
        return None
