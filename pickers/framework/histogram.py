"""A histogram cheap enough for the request path: a bucket count and a sum, no lock.

prometheus_client's Histogram.observe takes a lock per call (about 3 us here); this one costs a
bisect and two additions (about 0.3 us). Only the event loop's thread writes it, so there is nothing
to lock against; the EPP's scrape may read it from a worker thread meanwhile (`cumulative` reads each
bucket once, so the buckets it returns always rise and the last one is the count; `sum` may lag them
by an observation) and turns it into a Prometheus histogram.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)  # upper bounds (le), ascending; +Inf is implied
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le semantics: value <= bound
        self.sum += value

    def observe_many(self, value: float, n: int) -> None:
        """`n` observations of one value (e.g. the endpoints that hold nothing of a request)."""
        if n > 0:
            self.counts[bisect_left(self.bounds, value)] += n
            self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bucket, +Inf last."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out
