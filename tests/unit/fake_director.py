"""A Director for driving RequestStream alone: it routes to fixed addresses and records what the
state machine tells it, so protocol tests need no datastore, scheduler or metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extproc.handlers.request_stream import Outcome, Routing, filter_by_subset
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import NO_ENDPOINTS, RequestError
from pickers.framework.request import InferenceRequest


@dataclass
class FakeDirector:
    """Routes to the first `max_endpoints` addresses (inside the subset hint, if any)."""

    addresses: Sequence[str] = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")
    max_endpoints: int = 1
    scores: str | None = None  # the explained-scores JSON to hand back, when testing explain
    request_headers: Mapping[str, str] = field(default_factory=dict)
    response_headers: Mapping[str, str] = field(default_factory=dict)
    routed: list[InferenceRequest] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    rejections: list[RequestError] = field(default_factory=list)
    abandons: list[InferenceRequest] = field(default_factory=list)
    first_bytes: int = 0
    in_flight: int = 0
    prepare_first: bool = False  # parsed requests wait in PREPARING for `prepare`
    prepared: list[InferenceRequest] = field(default_factory=list)
    metadata: Mapping[str, Mapping[str, float]] | None = None  # the response metadata to hand back at a body's end
    reported: list[object] = field(default_factory=list)  # the usage each `response_metadata` call got

    def __post_init__(self) -> None:
        self.endpoints = [Endpoint(EndpointSpec(a, *a.rsplit(":", 1)[:1], int(a.rsplit(":", 1)[1]))) for a in self.addresses]

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing:
        candidates = filter_by_subset(self.endpoints, subset)
        if not candidates:
            raise RequestError(NO_ENDPOINTS, "no endpoints available to serve the request")
        chosen = list(candidates)[: self.max_endpoints]
        request.target_model = request.model
        self.routed.append(request)
        self.in_flight += 1
        destination = ",".join(ep.address for ep in chosen)
        return Routing(request, destination, chosen[0], request.prompt_tokens, self.scores,
                       self.request_headers, self.response_headers, "default")  # fmt: skip

    def needs_data(self, request: InferenceRequest) -> bool:
        return self.prepare_first

    async def prepare(self, request: InferenceRequest, subset: list[str] | None = None) -> None:
        self.prepared.append(request)

    def finish(self, routing: Routing, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.in_flight -= 1

    def first_byte(self, routing: Routing, end_of_stream: bool = False) -> None:
        self.first_bytes += 1

    def abandoned(self, request: InferenceRequest) -> None:
        self.abandons.append(request)

    def rejected(self, request: InferenceRequest | None, error: RequestError, routed: bool = False) -> None:
        self.rejections.append(error)

    def response_metadata(self, routing: Routing, usage: object | None) -> Mapping[str, Mapping[str, float]] | None:
        self.reported.append(usage)
        return self.metadata
