"""random-picker: uniform choice, scores ignored; more endpoints = a random order of fallbacks."""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.picker import EndpointPicker


class RandomPicker(EndpointPicker):
    type = "random-picker"

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        k = min(self.max_endpoints, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), k)]
