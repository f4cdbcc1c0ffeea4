"""running-requests-size-scorer: fewer running requests (as the server reports) scores higher, min-max."""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin
from pickers.plugins.scorer.load.queue import min_max_low_is_best


class RunningRequestsSizeScorer(Plugin):
    type = "running-requests-size-scorer"
    category = "distribution"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_low_is_best([ep.metrics.running for ep in endpoints])
