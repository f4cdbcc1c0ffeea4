"""latency-cost-scorer (llm-epp's own): score each endpoint by what the request costs the pool there,
in predicted seconds of waiting, from the latency model (predicted-latency-producer's predictions):

    cost(e) = TTFT(e, r) with u'(e) uncached tokens        the request's own wait for its first token
            + slowdownWeight * prefill(e, u) * running(e)  the stall its prefill adds to every request
                                                           decoding on e (one step that long for each)
            + prefill(e, u) if e has no room for u         what it evicts: blocks used in the last
                                                           minute, which their owners compute again;
              (0.25 * prefill(e, u) where it fits: the    a duplicate takes cache that later prompts
              cache it takes)                              may need, so the holder of a prefix wins ties
    prefill(e, u) = u uncached prompt tokens on e / e's fitted prefill rate
    u'(e) = u(e) - (1 - 1/fanout) * the shared prefix's part of u(e), when e has room for it
    score(e) = min over candidates of cost / cost(e)       1 for the cheapest, in (0, 1]

The shared prefix is the part of the prompt after which the index saw prompts go on in `fanout`
different ways (a system prompt that many conversations continue, not a conversation's own history):
computing it on one more endpoint is paid once and serves the conversations that come after, so a
request is charged its share. Only where it fits without evicting anything live: otherwise copying
a shared context to another endpoint only moves the misses around (more contexts than caches).

The first term is what llm-d's latency-scorer minimizes. The second is what it leaves out: a prompt
that is cheap on a busy endpoint (its shared prefix cached there) holds up that endpoint's whole
batch, so piling every conversation behind one long system prompt onto the endpoint that cached it
first costs the pool more than paying that prefix once more on an idle endpoint. With it, cached
work stays where it is cached until the load there outweighs the extra prefill elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.framework.request import CHARS_PER_TOKEN
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import LatencyConsumer
from pickers.plugins.scorer.affinity.prefix import prefix_match

_FLOOR_S = 1e-4  # a cost below 0.1 ms is 0.1 ms: scores stay finite and near-free endpoints tie
LIVE_S = 60.0  # a cached block used within the last minute is live: evicting it costs its recompute
# Writing new blocks where they fit still takes cache that later prompts may need: a quarter of their
# compute, so of two endpoints equally fast for a request the one that already holds its prefix wins
# (a burst of one prompt stays together until the queue there outweighs computing it again).
FOOTPRINT = 0.25


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
        costs = self.cost_columns(request, cycle, endpoints)
        return [None] * len(endpoints) if costs is None else costs.tolist()

    def cost_columns(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> np.ndarray | None:
        """`costs` as an array aligned with the endpoints; None without predictions (predictInProduce off)."""
        producer = self.producer
        pc = producer.prediction_columns(request, cycle, endpoints)
        if pc is None:
            return None
        columns = cycle.columns(endpoints)
        w = self.slowdown_weight
        index = self.ctx.prefix_index
        shared = block_tokens = 0
        fanout = 1
        matched: np.ndarray | None = None
        if producer.precise is None:  # the approximate index knows the prompt's blocks and who holds them
            src = producer.source
            pm = prefix_match(request, cycle, index, src.block_chars, src.max_blocks)
            block_tokens = max(1, src.block_chars // CHARS_PER_TOKEN)
            if pm.matched:
                shared, fanout = index.shared_prefix(pm.hashes, max(pm.matched.values()))
                matched = columns.scatter(pm.matched)
        u = pc.uncached
        new_blocks = np.floor_divide(u, block_tokens) if block_tokens else np.zeros(columns.size)
        room = index.room_columns(index.endpoint_ids(columns.addresses), new_blocks, time.monotonic(), LIVE_S)
        charged = u
        if shared and matched is not None:
            missing = np.maximum(0.0, shared - matched) * block_tokens
            charged = np.where(room, np.maximum(0.0, u - np.round(missing * (1.0 - 1.0 / fanout))), u)
        c, batch = pc.coefficients, pc.batch  # the predictions' own (batch_of)
        if charged is u:  # ttft(e, charged): the prediction's own
            cost = pc.ttft_s + w * (c[1] * u) * batch if w else pc.ttft_s.copy()
        else:
            cost = c[0] + c[1] * (pc.queued + charged) + c[2] * batch
            if w:
                cost += w * (c[1] * u) * batch  # the stall: prefill_seconds(e, u) x the batch
        written = new_blocks * block_tokens
        # where it fits, a shared prefix's copy serves the conversations after this one: its share, as
        # above (without a shared prefix, charged is u >= written: the footprint of what it writes)
        if charged is u:
            cw = c[1] * written
            cost += np.where(room, FOOTPRINT * cw, cw)
        else:
            cost += np.where(room, FOOTPRINT * (c[1] * np.minimum(charged, written)), c[1] * written)
        cycle.data[self._key] = (columns.addresses, cost)
        return cost

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> np.ndarray:
        costs = self.cost_columns(request, cycle, endpoints)
        if costs is None or not costs.size:  # no predictions (predictInProduce off): no opinion
            return np.zeros(len(endpoints))
        best = max(float(np.minimum.reduce(costs)), _FLOOR_S)
        return best / np.maximum(costs, _FLOOR_S)

    def explain(self, cycle: CycleState) -> dict[str, dict[str, float]]:
        out = dict(super().explain(cycle))
        found = cycle.data.get(self._key)
        if isinstance(found, tuple):
            addresses, costs = found
            out[f"{self.name}/cost_ms"] = {a: round(c * 1000.0, 1) for a, c in zip(addresses, costs.tolist())}
        return out
