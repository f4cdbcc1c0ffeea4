"""round-robin-picker: each endpoint in turn (by address order), scores ignored. A baseline."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.picker import EndpointPicker


class RoundRobinPicker(EndpointPicker):
    type = "round-robin-picker"

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None, name: str | None = None) -> None:
        super().__init__(max_endpoints, rng, name)
        self._next = 0

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        ordered = sorted((s.endpoint for s in scored), key=lambda ep: ep.address)
        n = len(ordered)
        start = self._next % n
        self._next = start + 1
        k = min(self.max_endpoints, n)
        return [ordered[(start + i) % n] for i in range(k)]
