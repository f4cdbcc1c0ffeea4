"""Ordering within a flow (llm-d's): the item with the smallest key dispatches first.

fcfs-ordering-policy: by enqueue time (when flow control accepted the request). edf-ordering-policy:
by deadline, enqueue time + TTL (a request without a TTL sorts after every request with one), ties
by enqueue time. Neither takes parameters.
"""

from __future__ import annotations

import math

from pickers.framework.flowcontrol import QueueItem
from pickers.plugins.base import Plugin


class FcfsOrdering(Plugin):
    type = "fcfs-ordering-policy"

    def key(self, item: QueueItem) -> float:
        return item.enqueued_at


class EdfOrdering(Plugin):
    type = "edf-ordering-policy"

    def key(self, item: QueueItem) -> tuple[float, float]:
        ttl = item.ttl
        deadline = item.enqueued_at + ttl if ttl > 0 else math.inf
        return (deadline, item.enqueued_at)
