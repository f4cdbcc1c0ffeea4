"""max-score-picker: highest total score first; ties broken at random; the next best are fallbacks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.picker import EndpointPicker


class MaxScorePicker(EndpointPicker):
    type = "max-score-picker"

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

    def pick_totals(self, request: InferenceRequest, endpoints: Sequence[Endpoint], totals: np.ndarray) -> list[Endpoint] | None:
        """`pick` on the totals as one array: the same endpoint for the same random draws."""
        if self.max_endpoints != 1 or not len(endpoints):
            return None  # ranked fallbacks: `pick`
        best = np.maximum.reduce(totals)  # ndarray.max without its Python wrapper
        if best != best:
            return None  # a NaN total (the max is NaN then), compared as Python compares them: `pick`
        top = (totals == best).nonzero()[0]
        if top.size == 1:
            return [endpoints[int(top[0])]]
        return [endpoints[self.rng.choice(top.tolist())]]
