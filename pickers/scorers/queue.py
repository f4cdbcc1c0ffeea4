"""queue-scorer: fewer waiting requests scores higher, min-max normalised over the candidates."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datastore import Endpoint
from extproc.inference_request import InferenceRequest
from pickers.types import CycleState


class QueueScorer:
    type = "queue-scorer"
    category = "distribution"

    def __init__(self, name: str = "queue-scorer") -> None:
        self.name = name

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        queues = [ep.metrics.waiting for ep in endpoints]
        lo, hi = min(queues, default=0), max(queues, default=0)
        if hi == lo:
            return [1.0] * len(endpoints)
        span = hi - lo
        return [(hi - q) / span for q in queues]
