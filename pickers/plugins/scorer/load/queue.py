"""queue-scorer: fewer waiting requests scores higher, min-max normalised over the candidates; its
multi-cluster variant reads each peer cluster's mean queue instead."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pickers.framework.columns import filled
from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin

_min, _max = np.minimum.reduce, np.maximum.reduce


def min_max_low_is_best(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min): the lowest value scores 1, the highest 0; 1 for all when they are equal."""
    lo, hi = min(values, default=0), max(values, default=0)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


class QueueScorer(Plugin):
    type = "queue-scorer"
    category = "distribution"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> np.ndarray:
        waiting = cycle.columns(endpoints).waiting()
        if not waiting.size:
            return waiting
        lo, hi = _min(waiting), _max(waiting)  # the ufuncs' own reductions: ndarray.min's wrapper costs as much again
        if hi == lo:
            return filled(waiting.size, 1.0)
        return (hi - waiting) / (hi - lo)  # min_max_low_is_best on the column


class MulticlusterQueueScorer(QueueScorer):
    """multicluster-queue-scorer (llm-d): a peer cluster's mean waiting queue (multicluster-metrics-extractor),
    min-max normalised over the clusters that have one as queue-scorer does; 0 for a cluster not scraped yet."""

    type = "multicluster-queue-scorer"
    reads_pool_metrics = True  # the data layer must scrape clusters (pickers.config.datalayer)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        queues = [ep.metrics.pool_queue for ep in endpoints]
        known = min_max_low_is_best([q for q in queues if q is not None])
        it = iter(known)
        return [0.0 if q is None else next(it) for q in queues]
