"""load-aware-scorer (llm-d): an empty queue scores 0.5, a queue at `threshold` or beyond 0, linear between.

Unlike queue-scorer the score is absolute, so a pool that is evenly loaded still tells busy from idle.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

DEFAULT_THRESHOLD = 128


class LoadAwareScorer(Plugin):
    type = "load-aware-scorer"
    category = "distribution"

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, name: str = "load-aware-scorer") -> None:
        self.name = name
        self.threshold = threshold

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LoadAwareScorer:
        return cls(p.integer("threshold", DEFAULT_THRESHOLD, minimum=1), name)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        out = []
        for ep in endpoints:
            q = ep.metrics.waiting
            out.append(0.5 if q <= 0 else 0.0 if q >= t else 0.5 * (1.0 - q / t))
        return out
