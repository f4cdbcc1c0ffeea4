"""active-request-scorer (llm-d): requests the EPP itself has in flight per endpoint (`Endpoint.in_flight`,
counted from pick to response end), so it sees a burst before any scrape does. Idle endpoints score 1,
the busiest 0, the rest (max - n) / max.

llm-epp extension: with `maxRequests: N` the scale is absolute instead, `1 - min(1, n / N)`, so one
request more or less moves the score by 1/N and does not break cache affinity by itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext


class ActiveRequestScorer(Plugin):
    type = "active-request-scorer"
    category = "distribution"

    def __init__(self, name: str = "active-request-scorer", max_requests: int | None = None) -> None:
        self.name = name
        self.max_requests = max_requests

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ActiveRequestScorer:
        p.deprecated(
            "requestTimeout",
            "llm-d ignores it too; a request leaves the count when its response ends, the client goes away or the upstream fails",
        )
        max_requests = p.integer("maxRequests", 0, minimum=0)
        return cls(name, max_requests or None)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.max_requests:
            n = self.max_requests
            return [1.0 - min(1.0, ep.in_flight / n) for ep in endpoints]
        busiest = max((ep.in_flight for ep in endpoints), default=0)
        if busiest <= 0:
            return [1.0] * len(endpoints)
        return [(busiest - ep.in_flight) / busiest for ep in endpoints]
