"""random-picker: uniform choice, scores ignored; more endpoints = a random order of fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence

from extproc.datastore import Endpoint
from extproc.inference_request import InferenceRequest
from pickers.types import ScoredEndpoint


class RandomPicker:
    type = "random-picker"

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None, name: str = "random-picker"):
        self.name = name
        self.max_endpoints = max_endpoints
        self.rng = rng or random.Random()

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        k = min(self.max_endpoints, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), k)]
