"""active-request-scorer (llm-d): requests the EPP itself has in flight per endpoint (`Endpoint.in_flight`,
counted from pick to response end), so it sees a burst before any scrape does. Idle endpoints score 1,
the busiest 0, the rest (max - n) / max.
"""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datastore import Endpoint
from extproc.inference_request import InferenceRequest
from pickers.params import Params
from pickers.types import CycleState, PluginContext


class ActiveRequestScorer:
    type = "active-request-scorer"
    category = "distribution"

    def __init__(self, name: str = "active-request-scorer") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ActiveRequestScorer:
        # llm-d expires requests it never saw finish; ours are released when the stream ends, always.
        p.ignore("requestTimeout")
        return cls(name)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        busiest = max((ep.in_flight for ep in endpoints), default=0)
        if busiest <= 0:
            return [1.0] * len(endpoints)
        return [(busiest - ep.in_flight) / busiest for ep in endpoints]
