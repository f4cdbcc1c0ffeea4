"""The queues flow control holds requests in: one per flow (fairness id within a priority), grouped
into one band per priority. They implement the contracts the policies read (pickers.framework.flowcontrol:
QueueItem, FlowQueue, PriorityBand); only the controller (extproc.flowcontrol.controller) changes them.

A flow's queue is a heap on (the band's ordering key, arrival number), so ties dispatch in arrival
order; an item removed before it dispatches (a client gone, a TTL) is marked and dropped when it comes
to the top, but its count and bytes leave the books at once. A flow whose queue empties is removed, so
the flows held are never more than the requests held.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pickers.framework.flowcontrol import BandConfig, FlowKey
from pickers.framework.request import InferenceRequest


@dataclass(slots=True, eq=False)
class Item:
    """One waiting request (a QueueItem). `waiter` is what its request path awaits; `dispatch` runs the pick."""

    request_id: str
    flow: FlowKey
    request: InferenceRequest
    byte_size: int
    received_at: float
    enqueued_at: float
    ttl: float
    seq: int  # arrival number: breaks ordering ties
    dispatch: Callable[[], Any] = field(repr=False)
    waiter: asyncio.Future[Any] = field(repr=False)
    queued: bool = True  # False once dispatched or removed


class Queue:
    """One flow's queue (a FlowQueue), ordered by the band's ordering policy."""

    __slots__ = ("_heap", "_key", "byte_size", "count", "flow")

    def __init__(self, flow: FlowKey, key: Callable[[Item], Any]) -> None:
        self.flow = flow
        self._key = key
        self._heap: list[tuple[Any, int, Item]] = []
        self.count = 0
        self.byte_size = 0

    def __len__(self) -> int:
        return self.count

    def push(self, item: Item) -> None:
        heapq.heappush(self._heap, (self._key(item), item.seq, item))
        self.count += 1
        self.byte_size += item.byte_size

    def head(self) -> Item | None:
        heap = self._heap
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop(self) -> Item | None:
        item = self.head()
        if item is not None:
            heapq.heappop(self._heap)
            self.forget(item)
        return item

    def forget(self, item: Item) -> None:
        """`item` leaves the books now (it stays in the heap, marked, until it reaches the top)."""
        item.queued = False
        self.count -= 1
        self.byte_size -= item.byte_size
        heap = self._heap
        if self.count == 0:
            heap.clear()  # only marked entries are left: let their requests go now
        elif len(heap) > 2 * self.count + 16:  # mostly marked: rebuild, so removed requests are not held
            self._heap = [e for e in heap if e[2].queued]
            heapq.heapify(self._heap)


class Band:
    """The flows of one priority (a PriorityBand), with its bounds and its fairness policy's state."""

    def __init__(self, config: BandConfig) -> None:
        self.config = config
        self.priority = config.priority
        self.ordering = config.ordering  # the OrderingPolicy (global-strict-fairness compares heads with it)
        self.policy_state = config.fairness.new_state()
        self._queues: dict[str, Queue] = {}  # by fairness id, in the order flows arrived
        self._flows: tuple[FlowKey, ...] | None = ()
        self.count = 0
        self.byte_size = 0

    def reconfigure(self, config: BandConfig) -> None:
        """New bounds and policies for this priority (a reload); the queues held keep their ordering."""
        if type(config.fairness) is not type(self.config.fairness):
            self.policy_state = config.fairness.new_state()
        self.config = config
        self.ordering = config.ordering

    def flows(self) -> Sequence[FlowKey]:
        if self._flows is None:
            self._flows = tuple(q.flow for q in self._queues.values())
        return self._flows

    def queue(self, flow_id: str) -> Queue | None:
        return self._queues.get(flow_id)

    def queues(self) -> Iterator[Queue]:
        return iter(tuple(self._queues.values()))

    def fits(self, byte_size: int) -> bool:
        c = self.config
        return (c.max_requests <= 0 or self.count + 1 <= c.max_requests) and (c.max_bytes <= 0 or self.byte_size + byte_size <= c.max_bytes)

    def push(self, item: Item) -> None:
        q = self._queues.get(item.flow.id)
        if q is None:
            q = self._queues[item.flow.id] = Queue(item.flow, self.ordering.key)
            self._flows = None
        q.push(item)
        self.count += 1
        self.byte_size += item.byte_size

    def pick(self) -> Item | None:
        """The fairness policy's flow, then that flow's head (the ordering policy's); None: nothing to send."""
        if not self.count:
            return None
        q = self.config.fairness.pick(self)
        if q is None:
            return None
        own = self._queues.get(q.flow.id)
        return own.head() if own is not None else None

    def remove(self, item: Item) -> None:
        """Take `item` off the books (dispatched or dropped); drop its flow when that empties."""
        q = self._queues.get(item.flow.id)
        if q is None or not item.queued:
            return
        if q.head() is item:
            q.pop()
        else:
            q.forget(item)
        self.count -= 1
        self.byte_size -= item.byte_size
        if not q.count:
            del self._queues[item.flow.id]
            self._flows = None
