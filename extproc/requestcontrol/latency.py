"""Feeding the latency model (pickers.latency.model) from each request's life: what the chosen
endpoints looked like at the pick, then the response's time to first byte and its usage.

At the pick (`on_pick`, before the request's own in-flight charge): the endpoint that computes the
prompt (the primary, or P/D's prefill endpoint), the prefill tokens queued ahead of it there, its
running batch and this request's uncached tokens there (the plugins' estimate: see `uncached_on`);
the model's prediction for that state is made then under --explain-scores (for the response header
and the running error /debug/endpoints shows; without it the error is the fit's own). At the end (`on_end`): time to first token = first
response byte - pick, so the time the request spent in flow control's queue or in the token-producer
is not the server's; time per output token = (end - first byte) / (completion tokens - 1). The
fit learns from the server's own count of the uncached tokens when its usage reports cached tokens
(vLLM's `prompt_tokens_details`), else from the estimate. A P/D request teaches the prefill
endpoint its prefill: the observation less the model's KV transfer and first decode step. A
non-streamed response's first byte is its end: it teaches TTFT only when it has one token, or once
the endpoint's TPOT is fitted (its decode time is then taken off). Errors and aborts teach nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.handlers.usage import Usage
from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import SchedulingResult
from pickers.latency.model import LatencyModel, batch_of

# Under --explain-scores, on the client's response: the model's prediction for the route taken.
PREDICTED_TTFT_HEADER = "x-llm-epp-predicted-ttft-ms"
PREDICTED_TPOT_HEADER = "x-llm-epp-predicted-tpot-ms"


@dataclass(slots=True)
class LatencyRecord:
    """One routed request as the model saw it at the pick (Routing.latency)."""

    prefiller: Endpoint  # computes the prompt: the primary, or the P/D prefill endpoint
    decoder: Endpoint  # the primary
    queued: int  # prefill tokens queued ahead on the prefiller
    uncached: int  # this request's uncached prompt tokens there (estimated)
    batch: int  # the prefiller's running batch
    decode_batch: int  # the primary's running batch
    transfer: int  # P/D: tokens of KV the decode endpoint pulls; 0 aggregated
    picked_at: float  # perf_counter seconds
    first_byte_at: float | None = None
    # the model's prediction for this route (seconds), made at the pick when asked (--explain-scores)
    predicted_ttft: float | None = None
    predicted_tpot: float | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefiller is not self.decoder


def uncached_on(result: SchedulingResult, ep: Endpoint, request: InferenceRequest) -> int:
    """The request's uncached prompt tokens on a chosen endpoint, as the plugins estimated them: the
    predicted-latency-producer's (`result.uncached`), an inflight-load-producer's charge, the
    prefill-load-scorer's count for the primary; else the whole prompt."""
    u = result.uncached
    if u is not None:
        found = u.get(ep.address)
        if found is not None:
            return found
    charges = result.in_flight
    if charges is not None:
        for c in charges:
            if c.endpoint is ep:
                return c.early_tokens
    if result.prefill_tokens and ep is result.endpoints[0]:
        return result.prefill_tokens
    return request.prompt_tokens


def predict(model: LatencyModel, rec: LatencyRecord, *, fresh: bool = True) -> tuple[float, float]:
    """The model's TTFT and TPOT (seconds) for the route and state the record holds."""
    if rec.prefiller is rec.decoder:
        ttft = model.ttft(rec.decoder, rec.uncached, queued=rec.queued, batch=rec.batch, fresh=fresh)
    else:
        ttft = model.ttft_disaggregated(
            rec.decoder, rec.prefiller, rec.uncached, rec.transfer, queued=rec.queued, batch=rec.batch, fresh=fresh
        )
    return ttft, model.tpot(rec.decoder, batch=rec.decode_batch, fresh=fresh)


def on_pick(model: LatencyModel, request: InferenceRequest, result: SchedulingResult, now: float, *, predicted: bool = False) -> LatencyRecord:
    """The pick's record; with `predicted`, the model's prediction for it too."""
    primary = result.endpoints[0]
    prefiller = primary
    if result.profile_results is not None:
        for eps in result.profile_results.values():
            if eps and eps[0] is not primary:
                prefiller = eps[0]
                break
    batch = batch_of(prefiller)
    rec = LatencyRecord(
        prefiller, primary, prefiller.in_flight_prefill_tokens, uncached_on(result, prefiller, request), batch,
        batch if prefiller is primary else batch_of(primary), 0 if prefiller is primary else uncached_on(result, primary, request), now,
    )  # fmt: skip
    if predicted:
        rec.predicted_ttft, rec.predicted_tpot = predict(model, rec)
    return rec


def on_end(
    model: LatencyModel, rec: LatencyRecord, status: int | None, streaming: bool, aborted: bool, usage: Usage | None, now: float
) -> None:
    first = rec.first_byte_at
    if aborted or status != 200 or first is None:
        rec.prefiller.latency.skipped += 1
        return
    completion = usage.completion_tokens if usage is not None else 0
    ttft = first - rec.picked_at
    predicted = rec.predicted_ttft  # None: the fit's own, for the running error
    if not streaming:
        if usage is None:
            rec.prefiller.latency.skipped += 1
            return  # its first byte may hold every token: no telling its TTFT
        if completion > 1:
            fit, source = model.tpot_fit(rec.decoder)
            if source != "own":
                rec.prefiller.latency.skipped += 1
                return  # no TPOT of its own yet to take the decode time off with
            c0, c1 = fit.coefficients()
            ttft -= (completion - 1) * (c0 + c1 * rec.decode_batch)
    elif completion > 1:
        model.observe_tpot(rec.decoder, rec.decode_batch, (now - first) / (completion - 1))
    uncached = rec.uncached
    if not rec.disaggregated:
        if usage is not None and usage.prompt_tokens_details is not None:
            uncached = max(0, usage.prompt_tokens - usage.cached_tokens)  # the server's own count
        model.observe_ttft(rec.prefiller, rec.queued + uncached, rec.batch, ttft, predicted)
        return
    # P/D: the prefill endpoint's share, without the transfer and the first decode step
    after = model.kv_transfer(rec.transfer) + model.tpot(rec.decoder, batch=rec.decode_batch, fresh=False)
    model.observe_ttft(rec.prefiller, rec.queued + uncached, rec.batch, ttft - after, None if predicted is None else predicted - after)
