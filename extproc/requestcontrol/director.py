"""The Director joins the protocol to the scheduler and the datastore: it admits a parsed request
(objective -> priority; sheddable requests refused while the pool is saturated; the model rewrite),
routes it (subset hint, schedule, in-flight accounting) and settles the books when the response ends.
Before the pick it awaits the data the token-producers must fetch (`prepare`, each bounded by its own
timeout; each in turn until one gives the ids: a config's own, then the one the old precise scorer's
tokenizer pool implies) and the async data producers' (a burst-prefix-cache-producer's batch window). In-flight
counts are one request and prompt + max_tokens tokens on the primary until the response ends (and
the primary's uncached prompt tokens until the first byte), unless an inflight-load-producer charged
the result (InFlightCharge: each chosen endpoint's request, uncached prompt until the first byte,
estimated output until the end).

With a latency model (`latency`, extproc.requestcontrol.latency) it records each pick's state and
feeds the model the response's first byte and usage at the end; under --explain-scores the model's
prediction for the route goes on the client's response (`x-llm-epp-predicted-ttft-ms`). At the end of
a response body the scheduler's reporters turn its usage into Envoy's dynamic metadata (`response_metadata`).

It also keeps the last `DECISIONS_KEPT` decisions for /debug/decisions (a tuple appended to a
bounded deque per request, with the admission rules that refused or flagged it), counts those rules'
decisions, hands each request's end to the audit trail when there is one (extproc.observability.audit:
`finish` for a routed request, `rejected` for one refused before its pick, `abandoned` for one whose
client left before either) and, only with
`log_requests`, writes one log line per request. What they
keep of a client's strings (request id, model names, objective) is bounded by
extproc.observability.bounds; the request itself goes on with its real values.

A config reload (extproc.server.reload) swaps `scheduler`, `token_producers` and the saturation
detector's config between requests; each Routing keeps the scheduler that chose it, whose plugins
are told of the response.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import Outcome, Routing, filter_by_subset
from extproc.handlers.usage import Usage, usage_object
from extproc.observability import bounds
from extproc.observability.logs import REQUEST_LOGGER
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol import latency as latency_feed
from extproc.requestcontrol.objectives import ObjectiveStore, objective_of
from extproc.requestcontrol.rewrites import RewriteStore, rewrite_header
from extproc.requestcontrol.saturation import SaturationDetector
from pickers.framework.errors import SATURATED, RequestError
from pickers.framework.flowcontrol import EvictionItem
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import InFlightCharge
from pickers.latency.model import LatencyModel
from pickers.plugins.producer.tokens import TokenProducer

if TYPE_CHECKING:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.flowcontrol.controller import FlowController
    from extproc.observability.audit import AuditLog
    from extproc.handlers.request_stream import RequestStream

DECISIONS_KEPT = 200
# (unix time, request id, model, destination, profile, scores or None, admission rules hit, error code or None)
Decision = tuple[float, str, str, str, str, "dict[str, dict[str, float]] | None", tuple[str, ...], "str | None"]

request_log = logging.getLogger(REQUEST_LOGGER)


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        metrics: EppMetrics,
        *,
        log_requests: bool = False,
        objectives: ObjectiveStore | None = None,
        rewrites: RewriteStore | None = None,
        saturation: SaturationDetector | None = None,
        token_producers: Sequence[TokenProducer] = (),
        flow_control: FlowController | None = None,
        latency: LatencyModel | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.metrics = metrics
        self.log_requests = log_requests
        self.objectives = objectives or ObjectiveStore()
        self.rewrites = rewrites or RewriteStore()
        self.saturation = saturation or SaturationDetector(datastore)
        self.decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self.token_producers = tuple(token_producers)  # asked in turn: a later one only for what none before gave
        self.flow_control = flow_control
        self.latency = latency  # fed with every response (extproc.requestcontrol.latency); None: not kept
        self.audit = audit  # one record per request (extproc.observability.audit); None: no audit trail

    def needs_data(self, request: InferenceRequest) -> bool:
        if self.flow_control is not None:
            return True  # every parsed request passes through the queues (`admit`)
        waiting = self.scheduler.async_producers
        if waiting and any(p.waits_for(request) for p in waiting):
            return True
        return any(tp.needs_io(request) for tp in self.token_producers)

    async def admit(self, stream: RequestStream, evict: Callable[[], None] | None = None) -> list[pb.ProcessingResponse]:
        """After `prepare`: the stream's answer, once flow control lets its request go (at once without
        it). The pick runs inside the dispatch (`stream.resume`), so the in-flight counts it adds are
        seen before the next request is let go. A refusal or drop (429/503) is the stream's answer too;
        `evict` ends the stream if the request is later evicted for a higher priority."""
        fc = self.flow_control
        if fc is None:
            return stream.resume()
        request = stream.request
        assert request is not None
        request.objective = objective_of(request.headers)
        request.priority = self.objectives.priority(request.objective)  # the band; `route` reads it again
        try:
            self.scheduler.admit(request, self.datastore.candidates())  # admitters run before the queues
        except RequestError as e:
            return stream.refuse(e)

        def dispatch() -> list[pb.ProcessingResponse]:
            out = stream.resume()
            routing = stream.routing
            if routing is not None and evict is not None and fc.reclaimer is not None:
                fc.track(EvictionItem(request.request_id, request.priority, time.monotonic(), routing.destination, request, evict), id(request))
            return out

        try:
            return await fc.enqueue_and_wait(request, stream.request_body_bytes, dispatch)
        except RequestError as e:
            return stream.refuse(e)

    async def prepare(self, request: InferenceRequest, subset: list[str] | None = None) -> None:
        """The token-producers' tokens for this request, then the async data producers' data (a
        burst-prefix-cache-producer's window, over the candidates the subset hint leaves), awaited
        before `route` (never raises a RequestError: a failure leaves the estimate, no candidate is
        `route`'s 503)."""
        for tp in self.token_producers:  # read once: a reload swaps the tuple
            await tp.prepare(request)  # nothing to do once one has set the ids
        waiting = self.scheduler.async_producers  # read once: a reload swaps the scheduler
        if waiting:
            try:
                candidates = filter_by_subset(self.datastore.candidates(), subset)
            except RequestError:
                return
            for producer in waiting:
                await producer.produce_async(request, candidates)

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing:
        start = time.perf_counter()
        # Ours from here on (decisions, logs, spans, the scheduler's debug line); the header itself
        # goes upstream untouched.
        request.request_id = bounds.request_id(request.request_id)
        model = request.model
        headers = request.headers
        request.objective = objective = objective_of(headers)
        request.priority = priority = self.objectives.priority(objective)
        request.target_model = self.rewrites.target(model, rewrite_header(headers)) if model else model
        pool = self.datastore.candidates()
        candidates = filter_by_subset(pool, subset)
        # Sheddable requests only: the saturation check reads every candidate's metrics. With flow
        # control, saturation is its queues' business instead.
        if priority < 0 and candidates and self.flow_control is None and self.saturation.saturated(candidates):
            raise RequestError(
                SATURATED, f"the pool is saturated and objective {bounds.objective(objective)!r} is sheddable (priority {priority})"
            )
        scheduler = self.scheduler  # read once: a config reload swaps it between requests
        if self.flow_control is None:
            scheduler.admit(request, candidates)  # with flow control, `admit` ran them before the queues
        result = scheduler.schedule(request, candidates, pool)
        primary = result.endpoints[0]
        request.prefill_tokens = result.prefill_tokens
        record = None
        if self.latency is not None:  # before this request's own charge: the queue it joins
            explain = scheduler.explain
            record = latency_feed.on_pick(self.latency, request, result, time.perf_counter(), predicted=explain)
            if explain and record.predicted_ttft is not None and record.predicted_tpot is not None:
                result.response_headers[latency_feed.PREDICTED_TTFT_HEADER] = f"{record.predicted_ttft * 1000:.1f}"
                result.response_headers[latency_feed.PREDICTED_TPOT_HEADER] = f"{record.predicted_tpot * 1000:.2f}"
        charges = result.in_flight
        if charges is None:
            tokens = request.prompt_tokens + (request.max_tokens or 0)
            self.datastore.acquire(primary, tokens, result.prefill_tokens)
        else:  # the inflight-load-producer's: prompt parts until the first byte, the rest until the end
            tokens = 0
            request.prefill_tokens = 0
            for c in charges:
                self.datastore.acquire(c.endpoint, c.tokens + c.early_tokens, c.early_tokens, c.requests, c.tokens)
        destination = result.destination()
        # the decision names the endpoints chosen (the ranks, under a data-parallel primaryPort)
        chosen = destination if not result.destination_port else ",".join(ep.address for ep in result.endpoints)
        scores = msgspec.json.encode(result.scores).decode() if result.scores is not None else None
        self.metrics.scheduled(model, time.perf_counter() - start, request.target_model)
        flags = tuple(request.flags) if request.flags else ()
        decision = (time.time(), request.request_id, bounds.model_name(model), chosen, result.profile, result.scores, flags, None)
        self.decisions.append(decision)
        return Routing(request, destination, primary, tokens, scores, result.request_headers, result.response_headers,
                       result.profile, charges=charges, scheduler=scheduler, latency=record,
                       capture=self.audit.response_capture if self.audit is not None else None)  # fmt: skip

    def rejected(self, request: InferenceRequest | None, error: RequestError, routed: bool = False) -> None:
        model = request.model if request else ""
        code = error.kind.code
        self.metrics.request_error(model, code, request.target_model if request else "")
        request_id = bounds.request_id(request.request_id) if request else ""  # refused before `route`, maybe
        model = bounds.model_name(model)
        flags = tuple(request.flags) if request is not None and request.flags else ()
        rules = (*flags, error.rule) if error.rule else flags
        self.decisions.append((time.time(), request_id, model, "", "", None, rules, code))
        if not routed:  # a routed one was counted and audited by `finish`
            self.metrics.admission(flags, error.rule)
            if self.audit is not None:
                self.audit.record_refused(request, error)
        if self.log_requests:
            request_log.info(
                "request rejected",
                extra={"fields": {"request_id": request_id, "model": model, "status": error.kind.status,
                                  "error_code": code, "error": bounds.message(error.message)}},
            )  # fmt: skip

    def abandoned(self, request: InferenceRequest) -> None:
        """The client left before the request was routed or refused: only the audit trail hears of it."""
        if request.flags:
            self.metrics.admission(request.flags)
        if self.audit is not None:
            self.audit.record_abandoned(request)

    def response_metadata(self, routing: Routing, usage: object | None) -> dict[str, dict[str, float]] | None:
        """The response body ended: what the scheduler's reporters (request-attribute-reporter) make of its
        usage, for Envoy's dynamic metadata. No reporter, no work."""
        scheduler = routing.scheduler or self.scheduler  # the one that chose: a reload may have swapped ours
        if not scheduler.reporters:
            return None
        return scheduler.response_metadata(usage_object(usage if isinstance(usage, Usage) else None)) or None

    def first_byte(self, routing: Routing, end_of_stream: bool = False) -> None:
        """The response's first body byte came back (`end_of_stream`: in a chunk that ends the body)."""
        record = routing.latency
        if isinstance(record, latency_feed.LatencyRecord):
            record.first_byte_at = time.perf_counter()
        self._prefill_done(routing)
        (routing.scheduler or self.scheduler).response_started(routing.request, routing.primary, end_of_stream)

    def _prefill_done(self, routing: Routing) -> None:
        """The request's prompt is computed: its prefill tokens and first-byte charges come off (once)."""
        request = routing.request
        if self.flow_control is not None:
            self.flow_control.kick()  # the prefill's tokens come off: room may have freed
        if request.prefill_tokens:
            self.datastore.prefill_done(routing.primary, request.prefill_tokens)
            request.prefill_tokens = 0
        if routing.charges is not None and not routing.early_released:
            routing.early_released = True
            c: InFlightCharge
            for c in routing.charges:
                self.datastore.prefill_done(c.endpoint, c.early_tokens)
                self.datastore.release(c.endpoint, c.early_tokens, c.requests if c.early_request else 0)

    def finish(self, routing: Routing, outcome: Outcome) -> None:
        self._prefill_done(routing)  # no-op if the first byte came; settles it if it never did
        if routing.charges is None:
            self.datastore.release(routing.primary, routing.tokens)
        else:
            for c in routing.charges:
                self.datastore.release(c.endpoint, c.tokens, 0 if c.early_request else c.requests, c.tokens)
        usage = outcome.usage if isinstance(outcome.usage, Usage) else None
        request = routing.request
        record = routing.latency
        if isinstance(record, latency_feed.LatencyRecord) and self.latency is not None:
            latency_feed.on_end(self.latency, record, outcome.status, outcome.streaming, outcome.aborted, usage, time.perf_counter())
        (routing.scheduler or self.scheduler).response_complete(
            request,
            routing.primary,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )
        self.metrics.completed(request.model, outcome, usage, request.target_model)
        if request.flags or (outcome.error is not None and outcome.error.rule):
            self.metrics.admission(request.flags or (), outcome.error.rule if outcome.error is not None else "")
        if self.audit is not None:
            self.audit.record_routed(routing, outcome, usage)
        if self.flow_control is not None:
            self.flow_control.finished(id(request))  # tracked under this key while it lives
        if self.log_requests:
            request_log.info("request", extra={"fields": request_fields(routing, outcome, usage)})


def request_fields(routing: Routing, outcome: Outcome, usage: Usage | None) -> dict[str, object]:
    """What one request log line says. Never headers or bodies: they may carry credentials."""
    fields: dict[str, object] = {
        "request_id": routing.request.request_id,  # bounded by `route`
        "model": bounds.model_name(routing.request.model),
        "endpoint": routing.destination,
        "priority": routing.request.priority,
        "served": outcome.served,
        "profile": routing.profile,
        "status": outcome.status,
        "aborted": outcome.aborted,
        "streaming": outcome.streaming,
        "duration_ms": round(outcome.duration * 1000, 3),
        "first_byte_ms": None if outcome.first_byte is None else round(outcome.first_byte * 1000, 3),  # TTFT when streaming
    }
    if routing.destination.partition(",")[0] != routing.primary.address:  # rewritten to a primaryPort
        fields["rank_endpoint"] = routing.primary.address
    if routing.request.target_model != routing.request.model:
        fields["target_model"] = bounds.model_name(routing.request.target_model)
    if usage is not None:
        fields.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens)
    if routing.scores is not None and request_log.isEnabledFor(logging.DEBUG):
        fields["scores"] = json.loads(routing.scores)
    return fields
