"""kv-cache-utilization-scorer: 1 - KV cache usage, so emptier caches score higher."""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin


class KVCacheUtilizationScorer(Plugin):
    type = "kv-cache-utilization-scorer"
    category = "distribution"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - ep.metrics.kv_usage for ep in endpoints]
