"""kv-cache-utilization-scorer: 1 - KV cache usage, so emptier caches score higher; its multi-cluster
variant reads each peer cluster's mean KV-cache utilization instead."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin


class KVCacheUtilizationScorer(Plugin):
    type = "kv-cache-utilization-scorer"
    category = "distribution"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> np.ndarray:
        return 1.0 - cycle.columns(endpoints).kv_usage()


class MulticlusterKVCacheUtilizationScorer(KVCacheUtilizationScorer):
    """multicluster-kv-cache-utilization-scorer (llm-d): 1 - a peer cluster's mean KV-cache utilization
    (multicluster-metrics-extractor); 0 for a cluster not scraped yet."""

    type = "multicluster-kv-cache-utilization-scorer"
    reads_pool_metrics = True  # the data layer must scrape clusters (pickers.config.datalayer)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        return [0.0 if (kv := ep.metrics.pool_kv_usage) is None else 1.0 - kv for ep in endpoints]
