"""weighted-random-picker: a random choice in proportion to the total scores, without replacement for
fallbacks (A-Res: key = U^(1/score), the largest keys win). Endpoints scoring 0 come last, in random
order; when every score is 0 the pick is uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import ScoredEndpoint
from pickers.plugins.picker import EndpointPicker


class WeightedRandomPicker(EndpointPicker):
    type = "weighted-random-picker"

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        rnd = self.rng.random
        keyed = []
        for s in scored:
            u = rnd()
            # (1, key) for positive scores, (0, u) for the rest: zero-score endpoints only as a last resort
            keyed.append(((1, u ** (1.0 / s.score)) if s.score > 0 else (0, u), s.endpoint))
        keyed.sort(key=lambda k: k[0], reverse=True)
        return [ep for _, ep in keyed[: self.max_endpoints]]
