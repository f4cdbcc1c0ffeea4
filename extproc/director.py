"""The Director joins the protocol to the scheduler and the datastore: it routes a parsed request
(subset hint, schedule, in-flight accounting) and settles the books when the response ends."""

from __future__ import annotations

import time

import msgspec

from extproc.datastore import Datastore
from extproc.errors import RequestError
from extproc.inference_request import InferenceRequest
from extproc.metrics import EppMetrics
from extproc.protocol import Outcome, Routing, filter_by_subset
from extproc.usage import Usage
from pickers.scheduler import Scheduler


class Director:
    def __init__(self, datastore: Datastore, scheduler: Scheduler, metrics: EppMetrics) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.metrics = metrics

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing:
        start = time.perf_counter()
        model = request.model
        candidates = filter_by_subset(self.datastore.candidates(), subset)
        result = self.scheduler.schedule(request, candidates)
        primary = result.endpoints[0]
        tokens = request.prompt_tokens + (request.max_tokens or 0)
        self.datastore.acquire(primary, tokens)
        destination = primary.address if len(result.endpoints) == 1 else ",".join(ep.address for ep in result.endpoints)
        scores = msgspec.json.encode(result.scores).decode() if result.scores is not None else None
        self.metrics.scheduled(model, time.perf_counter() - start)
        return Routing(request, destination, primary, tokens, scores, result.request_headers, result.response_headers)

    def rejected(self, request: InferenceRequest | None, error: RequestError) -> None:
        self.metrics.request_error(request.model if request else "", error.kind.code)

    def finish(self, routing: Routing, outcome: Outcome) -> None:
        self.datastore.release(routing.primary, routing.tokens)
        usage = outcome.usage if isinstance(outcome.usage, Usage) else None
        request = routing.request
        self.scheduler.response_complete(
            request,
            routing.primary,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )
        self.metrics.completed(request.model, outcome.status, usage, outcome.aborted)
