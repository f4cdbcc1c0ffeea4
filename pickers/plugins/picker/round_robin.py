"""round-robin-picker: each endpoint in turn (by address order), scores ignored. A baseline."""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.base import PluginContext
from pickers.plugins.picker import max_endpoints_param


class RoundRobinPicker:
    type = "round-robin-picker"

    def __init__(self, max_endpoints: int = 1, name: str = "round-robin-picker"):
        self.name = name
        self.max_endpoints = max_endpoints
        self._next = 0

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> RoundRobinPicker:
        return cls(max_endpoints_param(p, ctx), name)

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        ordered = sorted((s.endpoint for s in scored), key=lambda ep: ep.address)
        n = len(ordered)
        start = self._next % n
        self._next = start + 1
        k = min(self.max_endpoints, n)
        return [ordered[(start + i) % n] for i in range(k)]
