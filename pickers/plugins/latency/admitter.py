"""latency-slo-admitter (llm-d): refuse a sheddable request that no endpoint is predicted to serve
within its SLOs.

Requests with priority >= 0, and requests without an `x-llm-d-slo-ttft-ms` or `x-llm-d-slo-tpot-ms`
header, are always admitted. A sheddable one (priority < 0) is admitted when any candidate has a
valid prediction (both SLOs met), is idle (scraped `running` 0) or is cold (KV cache under 2% used:
its predictions are not to be trusted yet), and when there are no predictions at all (fail open).
Otherwise it is refused with llm-d's answer: HTTP 500, "request cannot be admitted: no valid endpoint
available to serve the request".

It runs where llm-d runs it: after flow control let the request go and the data producers ran, before
the scheduling profiles (a CycleAdmitter), so the predictions it reads are the pick's.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import NOT_ADMITTED, RequestError
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import TPOT_SLO_HEADER, TTFT_SLO_HEADER, LatencyConsumer, slo_ms

COLD_KV_USAGE = 0.02


class LatencySloAdmitter(LatencyConsumer):
    type = "latency-slo-admitter"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencySloAdmitter:
        a = cls(ctx, name)
        a.read_producer_name(p)
        return a

    def admit_cycle(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if request.priority >= 0:
            return
        headers = request.headers
        if slo_ms(headers, TTFT_SLO_HEADER) <= 0 and slo_ms(headers, TPOT_SLO_HEADER) <= 0:
            return
        found = self.predictions(request, cycle, endpoints)
        if not found:
            return
        for ep in endpoints:
            m = ep.metrics
            if m.kv_usage < COLD_KV_USAGE or m.running == 0:
                return
            p = found.get(ep.address)
            if p is not None and p.valid:
                return
        raise RequestError(NOT_ADMITTED, "request cannot be admitted: no valid endpoint available to serve the request", rule=self.name)
