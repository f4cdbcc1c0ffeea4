"""kv-cache-utilization-scorer: 1 - KV cache usage, so emptier caches score higher."""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext


class KVCacheUtilizationScorer:
    type = "kv-cache-utilization-scorer"
    category = "distribution"

    def __init__(self, name: str = "kv-cache-utilization-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> KVCacheUtilizationScorer:
        return cls(name)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - ep.metrics.kv_usage for ep in endpoints]
