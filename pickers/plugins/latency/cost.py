"""latency-cost-scorer (llm-epp's own): score each endpoint by what the request costs the pool there,
in predicted seconds of waiting, from the latency model (predicted-latency-producer's predictions):

    cost(e) = TTFT(e, r)                                   the request's own wait for its first token
            + slowdownWeight * prefill(e, r) * running(e)    the stall its prefill adds to every request
                                                           decoding on e (one step that long for each)
    prefill(e, r) = r's uncached prompt tokens on e / e's fitted prefill rate
    score(e) = min over candidates of cost / cost(e)       1 for the cheapest, in (0, 1]

The first term is what llm-d's latency-scorer minimizes. The second is what it leaves out: a prompt
that is cheap on a busy endpoint (its shared prefix cached there) holds up that endpoint's whole
batch, so piling every conversation behind one long system prompt onto the endpoint that cached it
first costs the pool more than paying that prefix once more on an idle endpoint. With it, cached
work stays where it is cached until the load there outweighs the extra prefill elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.latency.model import batch_of
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import LatencyConsumer

_FLOOR_S = 1e-4  # a cost below 0.1 ms is 0.1 ms: scores stay finite and near-free endpoints tie


class LatencyCostScorer(LatencyConsumer):
    type = "latency-cost-scorer"
    category = "distribution"

    def __init__(self, ctx: PluginContext, name: str = "latency-cost-scorer", *, slowdown_weight: float = 1.0) -> None:
        super().__init__(ctx, name)
        self.slowdown_weight = slowdown_weight
        self._key = f"latency-cost/{self.name}"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencyCostScorer:
        w = p.number("slowdownWeight", 1.0, minimum=0.0)
        if not math.isfinite(w):
            raise ParameterError("slowdownWeight", f"expected a finite number >= 0, got {w}")
        scorer = cls(ctx, name, slowdown_weight=w)
        scorer.read_producer_name(p)
        return scorer

    def costs(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float | None]:
        """Each endpoint's cost in seconds (None: no prediction for it); kept for --explain-scores."""
        found = self.predictions(request, cycle, endpoints)
        model, w = self.ctx.latency, self.slowdown_weight
        out: list[float | None] = []
        for ep in endpoints:
            p = found.get(ep.address)
            if p is None:
                out.append(None)
                continue
            cost = p.ttft_ms / 1000.0
            if w:
                cost += w * model.prefill_seconds(ep, p.uncached_tokens) * batch_of(ep)
            out.append(cost)
        cycle.data[self._key] = {ep.address: c for ep, c in zip(endpoints, out) if c is not None}
        return out

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        costs = self.costs(request, cycle, endpoints)
        known = [c for c in costs if c is not None]
        if not known:  # no predictions (predictInProduce off): no opinion
            return [0.0] * len(endpoints)
        best = max(min(known), _FLOOR_S)
        return [best / max(c, _FLOOR_S) if c is not None else 0.0 for c in costs]

    def explain(self, cycle: CycleState) -> dict[str, dict[str, float]]:
        out = dict(super().explain(cycle))
        found = cycle.data.get(self._key)
        if isinstance(found, dict) and found:
            out[f"{self.name}/cost_ms"] = {a: round(c * 1000.0, 1) for a, c in found.items()}
        return out
