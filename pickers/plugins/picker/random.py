"""random-picker: uniform choice, scores ignored; more endpoints = a random order of fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.base import PluginContext
from pickers.plugins.picker import max_endpoints_param


class RandomPicker:
    type = "random-picker"

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None, name: str = "random-picker"):
        self.name = name
        self.max_endpoints = max_endpoints
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> RandomPicker:
        return cls(max_endpoints_param(p, ctx), ctx.rng, name)

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        k = min(self.max_endpoints, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), k)]
