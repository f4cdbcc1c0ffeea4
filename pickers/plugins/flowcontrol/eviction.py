"""Eviction of dispatched requests to make room for higher priorities (llm-d's; with
`flowControl.enableEviction`). Neither takes parameters.

sheddable-eviction-filter: only sheddable requests (priority < 0) may be evicted.
priority-then-time-eviction-order-policy: the lowest priority first; among equals the one dispatched
last (it has the least KV cache invested).
"""

from __future__ import annotations

from pickers.framework.flowcontrol import EvictionItem
from pickers.plugins.base import Plugin


class SheddableEvictionFilter(Plugin):
    type = "sheddable-eviction-filter"

    def accept(self, item: EvictionItem) -> bool:
        return item.priority < 0


class PriorityThenTimeEvictionOrder(Plugin):
    type = "priority-then-time-eviction-order-policy"

    def key(self, item: EvictionItem) -> tuple[int, float]:
        return (item.priority, -item.dispatched_at)
