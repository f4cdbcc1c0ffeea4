"""slo-headroom-tier-filter (llm-d): keep the endpoints predicted to meet the request's SLOs.

Positive tier: TTFT and TPOT headroom both >= 0 (predicted-latency-producer's predictions); negative:
either below 0, and endpoints without a prediction. With both tiers present it keeps the positive one,
except with probability `epsilonExploreNeg` (default 0.01) the negative one, so an endpoint recovering
from overload still gets a request now and then to be re-measured; with one tier, that tier; with no
predictions at all, every candidate. Without SLO headers every headroom is negative: a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import LatencyConsumer


class SloHeadroomTierFilter(LatencyConsumer):
    type = "slo-headroom-tier-filter"

    def __init__(self, ctx: PluginContext, name: str = "slo-headroom-tier-filter", *, epsilon: float = 0.01) -> None:
        super().__init__(ctx, name)
        self.epsilon = epsilon
        self.rng = ctx.rng

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SloHeadroomTierFilter:
        epsilon = p.number("epsilonExploreNeg", 0.01)
        if not (0.0 <= epsilon <= 1.0) or math.isnan(epsilon):
            raise ParameterError("epsilonExploreNeg", f"must be in [0, 1], got {epsilon:g}")  # llm-d's check
        f = cls(ctx, name, epsilon=epsilon)
        f.read_producer_name(p)
        return f

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        found = self.predictions(request, cycle, endpoints)
        positive: list[Endpoint] = []
        negative: list[Endpoint] = []
        for ep in endpoints:
            p = found.get(ep.address)
            (positive if p is not None and p.ttft_headroom_ms >= 0 and p.tpot_headroom_ms >= 0 else negative).append(ep)
        if not positive:  # one tier (or no predictions at all): every candidate
            return endpoints
        if negative and self.rng.random() < self.epsilon:
            return negative
        return positive
