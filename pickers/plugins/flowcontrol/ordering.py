"""Ordering within a flow (llm-d's): the item with the smallest key dispatches first.

fcfs-ordering-policy: by enqueue time (when flow control accepted the request). edf-ordering-policy:
by deadline, enqueue time + TTL (a request without a TTL sorts after every request with one), ties
by enqueue time. slo-deadline-ordering-policy: by deadline, when the EPP received the request +
its `x-llm-d-slo-ttft-ms` header (or the deprecated `x-slo-ttft-ms`; a whole number of milliseconds
>= 0, as llm-d parses it); a request without a valid one sorts after every request with one; ties by
arrival. None takes parameters.
"""

from __future__ import annotations

import math

from pickers.framework.flowcontrol import QueueItem
from pickers.plugins.base import Plugin


class FcfsOrdering(Plugin):
    type = "fcfs-ordering-policy"

    def key(self, item: QueueItem) -> float:
        return item.enqueued_at


_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")


class SloDeadlineOrdering(Plugin):
    type = "slo-deadline-ordering-policy"

    def key(self, item: QueueItem) -> tuple[float, float]:
        headers = item.request.headers
        raw = headers.get(_SLO_HEADERS[0]) or headers.get(_SLO_HEADERS[1]) or ""
        text = raw.strip()
        deadline = math.inf
        if text.isascii() and (text.isdigit() or (text[:1] == "+" and text[1:].isdigit())):  # Go's ParseInt, base 10
            ms = int(text)
            if ms < 2**63 // 1_000_000:
                deadline = item.received_at + ms / 1000.0
        return (deadline, item.received_at)


class EdfOrdering(Plugin):
    type = "edf-ordering-policy"

    def key(self, item: QueueItem) -> tuple[float, float]:
        ttl = item.ttl
        deadline = item.enqueued_at + ttl if ttl > 0 else math.inf
        return (deadline, item.enqueued_at)
