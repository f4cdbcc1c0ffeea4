"""max-score-picker: highest total score first; ties broken at random; the next best are fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.base import PluginContext
from pickers.plugins.picker import max_endpoints_param


class MaxScorePicker:
    type = "max-score-picker"

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None, name: str = "max-score-picker"):
        self.name = name
        self.max_endpoints = max_endpoints
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MaxScorePicker:
        return cls(max_endpoints_param(p, ctx), ctx.rng, name)

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if self.max_endpoints == 1:
            best = max((s.score for s in scored), default=None)
            if best is None:
                return []
            top = [s.endpoint for s in scored if s.score == best]
            return [top[0] if len(top) == 1 else self.rng.choice(top)]
        rnd = self.rng.random
        ranked = sorted(scored, key=lambda s: (-s.score, rnd()))
        return [s.endpoint for s in ranked[: self.max_endpoints]]
