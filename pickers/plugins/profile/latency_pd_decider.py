"""latency-pd-decider (llm-epp's own): disaggregate a request only when the latency model predicts that
prefilling it on a prefill endpoint is worth it, and choose that endpoint (GPU or CPU) by predicted TTFT.

For the decode pick d and each prefill candidate p (seconds; u_e = the request's uncached prompt
tokens on e, from the prefix match of the predicted-latency-producer it reads):

    local     = TTFT(d, u_d)                           the queue ahead on d + u_d at d's fitted rate
    slowdown  = slowdownWeight x running batch of d x u_d / prefill_rate(d)
                (a local prefill stalls every sequence decoding on d for that long)
    remote(p) = TTFT(p, u_p) + KV transfer(u_d) + TPOT(d)

and disaggregates when min over p of remote(p) < local + slowdown. Short prompts (u_d below
`minUncachedTokens`) stay local without a look at the prefill pool.

It runs in two steps of disagg-profile-handler's decode-first order: asked after the decode
profile (`disaggregate`), it says whether the prefill profile is worth running (enough uncached
tokens, and a local cost above what any remote prefill costs on top of the transfer); listed as a
scorer in the prefill profile it scores each prefill candidate by remote(p) (best / remote(p), the
fastest 1), so that profile's pick is the fastest predicted; after the pick the handler asks it again
(`keep_prefill`), and it keeps the prefill only when that pick beats local + slowdown. So a CPU
prefill server takes only the work it is predicted to finish sooner.

An endpoint the model knows nothing of (no response seen from it, no warm endpoint of its hardware)
predicts from the GPU prior, which for a CPU server is ~50x too fast. Unless it has the decode
endpoint's KV geometry (then it is taken to be the same accelerator, prior against prior), such an
endpoint is tried with one request at a time of at most `maxProbeTokens` uncached tokens, and
scores 0 for longer ones: a slow server costs one short request to discover, not a queue of long ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.latency.model import LatencyModel, batch_of
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import LatencyConsumer

DEFAULT_MIN_UNCACHED_TOKENS = 256
DEFAULT_MAX_PROBE_TOKENS = 512
DEFAULT_SLOWDOWN_WEIGHT = 1.0


@dataclass(slots=True)
class PdDecision:
    """One request's decision inputs (seconds), kept in the cycle state for the scorer, the final
    check and --explain-scores."""

    decode: Endpoint
    uncached: int  # the request's uncached prompt tokens on the decode endpoint
    local: float  # predicted TTFT prefilled on the decode endpoint
    slowdown: float  # what that local prefill costs the decode endpoint's running batch (weighted)
    transfer: float  # KV transfer of the uncached tokens to the decode endpoint
    remote: dict[str, float] = field(default_factory=dict)  # prefill address -> predicted P/D TTFT
    disaggregated: str | None = None  # the prefill endpoint kept, if any

    @property
    def budget(self) -> float:
        """What a remote prefill must beat."""
        return self.local + self.slowdown


class LatencyPdDecider(LatencyConsumer):
    type = "latency-pd-decider"
    category = "distribution"

    def __init__(
        self,
        ctx: PluginContext,
        name: str = "latency-pd-decider",
        *,
        min_uncached_tokens: int = DEFAULT_MIN_UNCACHED_TOKENS,
        max_probe_tokens: int = DEFAULT_MAX_PROBE_TOKENS,
        slowdown_weight: float = DEFAULT_SLOWDOWN_WEIGHT,
    ) -> None:
        super().__init__(ctx, name)
        self.model: LatencyModel = ctx.latency
        self.min_uncached_tokens = min_uncached_tokens
        self.max_probe_tokens = max_probe_tokens
        self.slowdown_weight = slowdown_weight
        self._key = f"latency-pd-decision/{self.name}"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencyPdDecider:
        weight = p.number("slowdownWeight", DEFAULT_SLOWDOWN_WEIGHT, minimum=0.0)
        if weight != weight or weight == float("inf"):
            raise ParameterError("slowdownWeight", f"expected a finite number >= 0, got {weight}")
        decider = cls(
            ctx, name,
            min_uncached_tokens=p.integer("minUncachedTokens", DEFAULT_MIN_UNCACHED_TOKENS, minimum=0),
            max_probe_tokens=p.integer("maxProbeTokens", DEFAULT_MAX_PROBE_TOKENS, minimum=0),
            slowdown_weight=weight,
        )  # fmt: skip
        decider.read_producer_name(p)
        return decider

    # -- the decision ----------------------------------------------------------------------------
    def decision(self, cycle: CycleState) -> PdDecision | None:
        found = cycle.data.get(self._key)
        return found if isinstance(found, PdDecision) else None

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool:
        """After the decode pick: is the prefill profile worth running? No for short prompts, and when
        prefilling locally costs less than the transfer and the first decode step alone would."""
        if request.prompt_tokens < self.min_uncached_tokens:
            return False  # short even if nothing is cached: no prefix match needed
        u = self.producer.uncached(request, cycle, (decode,))[0]
        if u < self.min_uncached_tokens:
            return False
        model = self.model
        fit = model.ttft_fit(decode)[0]
        d = PdDecision(
            decode, u, model.ttft(decode, u),
            self.slowdown_weight * batch_of(decode) * u * fit.coefficients()[1], model.kv_transfer(u),
        )  # fmt: skip
        cycle.data[self._key] = d
        return d.budget > d.transfer + model.tpot(decode)

    def remote_costs(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float | None]:
        """Each prefill candidate's predicted P/D TTFT (None: untried, and the request is too long to
        try it with); without a decode pick in the cycle, its TTFT alone."""
        d = self.decision(cycle)
        model = self.model
        out: list[float | None] = []
        for ep, u in zip(endpoints, self.producer.uncached(request, cycle, endpoints)):
            if self.untried(ep, d.decode if d is not None else None) and (ep.in_flight or u > self.max_probe_tokens):
                out.append(None)
                continue
            if d is None:
                out.append(model.ttft(ep, u))
                continue
            cost = model.ttft(ep, u) + d.transfer + model.tpot(d.decode)
            d.remote[ep.address] = cost
            out.append(cost)
        return out

    def untried(self, ep: Endpoint, decode: Endpoint | None) -> bool:
        """Nothing observed of this endpoint or its hardware, and not the decode endpoint's geometry."""
        if self.model.ttft_fit(ep)[1] != "prior":
            return False
        if decode is None:
            return True
        mine, theirs = LatencyModel.hardware_class(ep), LatencyModel.hardware_class(decode)
        return mine is None or theirs is None or mine[1:] != theirs[1:]

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        """In the prefill profile: best predicted cost / this endpoint's (1 for the fastest, 0 for an
        untried endpoint the request is too long to try)."""
        costs = self.remote_costs(request, cycle, endpoints)
        best = min((c for c in costs if c is not None), default=None)
        if best is None:
            return [0.0] * len(endpoints)
        return [0.0 if c is None else 1.0 if c <= 0.0 else best / c for c in costs]

    def keep_prefill(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint, prefill: Endpoint) -> bool:
        """After the prefill profile's pick: disaggregate only when it beats prefilling locally."""
        d = self.decision(cycle)
        if d is None or d.decode is not decode or prefill is decode:
            return False
        cost = d.remote.get(prefill.address)
        if cost is None:  # not scored by this plugin in the prefill profile: predict the pick now
            cost = self.remote_costs(request, cycle, (prefill,))[0]
            if cost is None:
                return False
        if cost < d.budget:
            d.disaggregated = prefill.address
            return True
        return False

    # -- --explain-scores --------------------------------------------------------------------------
    def explain(self, cycle: CycleState) -> dict[str, dict[str, float]]:
        out = dict(super().explain(cycle))
        d = self.decision(cycle)
        if d is None:
            return out
        at = d.decode.address
        n = self.name
        out[f"{n}/local_ttft_ms"] = {at: round(d.local * 1000, 1)}
        out[f"{n}/slowdown_ms"] = {at: round(d.slowdown * 1000, 1)}
        out[f"{n}/transfer_ms"] = {at: round(d.transfer * 1000, 1)}
        out[f"{n}/remote_ttft_ms"] = {a: round(c * 1000, 1) for a, c in d.remote.items()}
        out[f"{n}/disaggregate"] = {at: 1.0 if d.disaggregated else 0.0}
        return out
