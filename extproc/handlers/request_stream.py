"""The life of one HTTP request through the EPP, as a state machine with no gRPC in it.

Everything that affects the state of a request stream lives in this file. `RequestStream.handle`
takes one ext_proc ProcessingRequest and returns the ProcessingResponses to send back; `close`
runs the completion bookkeeping whatever happened (abort included), exactly once.

States and the messages each accepts (anything else is a ProtocolError naming both):

    START          request_headers, response_headers
    REQUEST_BODY   request_body, request_trailers, response_headers   (buffering a body to parse)
    PREPARING      (none: the servicer awaits the Director's data, then calls `resume`)
    PASSTHROUGH    request_body, request_trailers, response_headers   (routed, body streams through)
    ROUTED         request_trailers, response_headers      (the whole request is with Envoy)
    RESPONSE_BODY  response_body, response_trailers
    DONE           response_trailers
    REJECTED       (anything: ignored, an ImmediateResponse was sent)

Which bodies are read, and how, is the config's request parsers' (extproc.handlers.parsers): a path
they do not read (passthrough-parser's) is routed on its headers and its body streams through
(PASSTHROUGH); a path none claims is refused with 400 before its body, when it has one.

PREPARING: when the Director needs data it must wait for before the pick (a token-producer's call
to the model server) or flow control holds requests, the parsed request waits there: `handle`
returns nothing, `needs_data` is true, the servicer awaits `Director.prepare(request, subset)`
(bounded by the producer's own timeout, or a burst-prefix-cache-producer's window) then
`Director.admit(stream)`, which returns `resume()`'s answer (the pick's) once flow control lets the
request go, or `refuse(error)`'s (429/503). The servicer reads no message meanwhile. A routed request flow control evicts is answered by `evict()` (429 `evicted`).

`response_headers` before the request was routed is a reply Envoy makes itself (its stream idle
timeout, a body over its buffer, a malformed request): it passes through unchanged, nothing to settle.

Body modes: FULL_DUPLEX_STREAMED (the body comes back to Envoy as `streamed_response` chunks of
at most 62,000 bytes) and BUFFERED (one BodyResponse carries the header mutation), read from the
`protocol_config` Envoy sends in the first message.

Limits (RequestLimits): the body is refused with 413 as soon as it is known to be too large (its
`content-length`, else the running size), never buffered past the limit; headers are refused with 431
when those the EPP adds would take them past the gateway's own limits, which Envoy otherwise meets
with an empty 500 after the mutation. While a FULL_DUPLEX body is due (REQUEST_BODY, PASSTHROUGH),
`body_idle_timeout` says how long the servicer may wait for the next message before calling
`body_timed_out` (408): the timer lives in the servicer, the state machine stays free of I/O.

Model rewrite: when the Director sets a `target_model` other than the requested model, the body is
re-encoded once with the new name (the only re-encoding) and `Content-Length` follows it; the response
loses its `content-length` and gets the requested name written back into its `"model"` fields.

Workers (`epp serve --workers N`, extproc.server.worker): a Director with `routes_later` picks in the
parent process, so every request waits in PREPARING for its pick, those with nothing to parse too.

Response metadata: the answer to the message that ends the response body (its end_of_stream chunk, or
the trailers when they end it) carries the Director's `response_metadata` as dynamic metadata (the
request-attribute-reporter's values; llm-d puts them on its last body answer the same way).
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc.handlers.model_name import ModelNameRestorer, rewrite_body
from extproc.handlers.parsers import DEFAULT, RequestParsers, Route
from extproc.handlers.capture import ResponseCapture
from extproc.handlers.usage import UsageReader
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import (
    BAD_REQUEST,
    EVICTED,
    HEADERS_TOO_LARGE,
    NO_ENDPOINTS,
    PAYLOAD_TOO_LARGE,
    PROTOCOL,
    REQUEST_TIMEOUT,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
)
from pickers.framework.request import InferenceRequest
from pickers.framework.types import InFlightCharge

if TYPE_CHECKING:
    from pickers.framework.scheduler import Scheduler

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SCORES_KEY = "x-gateway-destination-endpoint-scores"
REQUEST_ID_HEADER = "x-request-id"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
# Headers a client must never set: they would choose where the request goes.
STEERING_HEADERS = (
    DESTINATION_HEADER, "x-prefiller-host-port", "x-kv-cache-source-host-port", "x-kv-cache-source-p2p-port",
    "x-encoder-hosts-ports",
    "x-data-parallel-host-port",  # a sidecar forwards to the rank it names
)  # fmt: skip

STREAM_CHUNK = 62_000
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# The gateway's request header limits (Envoy's max_headers_count and max_request_headers_kb; these are
# Envoy's defaults, which most gateways keep). Envoy applies them again to the request after our
# mutation, so the EPP must refuse what would not fit. envoy/llm-gateway.yaml sets Envoy's own higher
# (128, 96 KiB): a request past these still reaches the EPP and gets its 431 with a message.
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_HEADERS_KB = 60
DEFAULT_BODY_IDLE_TIMEOUT = 30.0

BodyMode = processing_mode_pb2.ProcessingMode.BodySendMode
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
NONE = processing_mode_pb2.ProcessingMode.NONE
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
RepeatedHeaders = Any  # a HeaderMutation's set_headers (protobuf's repeated message container)


class State(enum.Enum):
    START = "start"
    REQUEST_BODY = "request_body"
    PREPARING = "preparing"
    PASSTHROUGH = "passthrough"
    ROUTED = "routed"
    RESPONSE_BODY = "response_body"
    DONE = "done"
    REJECTED = "rejected"


_ALLOWED: dict[State, frozenset[str]] = {
    State.START: frozenset({"request_headers", "response_headers"}),
    State.REQUEST_BODY: frozenset({"request_body", "request_trailers", "response_headers"}),
    State.PREPARING: frozenset(),
    State.PASSTHROUGH: frozenset({"request_body", "request_trailers", "response_headers"}),
    State.ROUTED: frozenset({"request_trailers", "response_headers"}),
    State.RESPONSE_BODY: frozenset({"response_body", "response_trailers"}),
    State.DONE: frozenset({"response_trailers"}),
}


@dataclass(slots=True, frozen=True)
class RequestLimits:
    """What one request may hold. The header limits must not exceed the gateway's (see DEFAULT_MAX_HEADERS)."""

    max_body_bytes: int = DEFAULT_MAX_BODY
    max_headers: int = DEFAULT_MAX_HEADERS  # pseudo-headers and those Envoy and the EPP add included
    max_headers_bytes: int = DEFAULT_MAX_HEADERS_KB * 1024  # names plus values
    body_idle_timeout: float | None = DEFAULT_BODY_IDLE_TIMEOUT  # seconds between request body chunks; None: none


class ProtocolError(Exception):
    def __init__(self, state: State, event: str):
        self.state = state
        self.event = event
        super().__init__(f"ext_proc message {event!r} is not allowed in state {state.value!r}")


@dataclass(slots=True)
class Routing:
    """A routing decision the Director made; handed back to it on completion."""

    request: InferenceRequest
    destination: str  # "ip:port[,ip:port...]"
    primary: Endpoint  # gets the in-flight count
    tokens: int
    scores: str | None = None  # JSON of per-scorer scores when explaining is on
    request_headers: Mapping[str, str] = field(default_factory=dict)  # set on the upstream request
    response_headers: Mapping[str, str] = field(default_factory=dict)  # set on the client's response
    profile: str = ""  # the scheduling profile (or profile handler's result) that chose
    trace: object | None = None  # the request's span, only with tracing on (extproc.requestcontrol.tracing)
    # an inflight-load-producer's charges (pickers.framework.types.InFlightCharge), released by the
    # Director; None: `tokens` on `primary`
    charges: list[InFlightCharge] | None = None
    early_released: bool = False  # the charges' first-byte parts came off
    # the scheduler that chose, told of the response: a config reload may have swapped the Director's
    # since, and the plugins that saw the pick are the ones to see its end (None: the Director's)
    scheduler: Scheduler | None = None
    # what the latency model saw at the pick (extproc.requestcontrol.latency.LatencyRecord); None: no model
    latency: object | None = None
    ticket: int = 0  # a worker's id of the parent's pick (extproc.server.worker); 0: picked here
    reports: bool = False  # a worker's: the parent's scheduler has response reporters
    # what the audit trail keeps of the response body (`--audit-response`): (hash or excerpt, bytes kept); None: nothing
    capture: tuple[str, int] | None = None


@dataclass(slots=True)
class Outcome:
    """How a routed request ended, for the Director's bookkeeping."""

    status: int | None  # upstream HTTP status; None if no response headers came
    streaming: bool
    usage: object | None  # extproc.handlers.usage.Usage
    aborted: bool
    served: str | None  # what Envoy reported as served, if it did
    # gateway-side timings (seconds, from the request headers reaching the EPP)
    duration: float = 0.0  # to the end of the response (or the abort)
    first_byte: float | None = None  # to the first response body chunk: TTFT for streamed replies
    body_chunks: int = 0  # response body chunks seen
    error: RequestError | None = None  # the EPP refused the routed request after its pick (431, evicted, ...)
    response: str | None = None  # the response body's SHA-256 or head, when Routing.capture asked


class Director(Protocol):
    """What the state machine needs from the rest of the EPP (scheduler + datastore)."""

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing: ...

    def needs_data(self, request: InferenceRequest) -> bool:
        """Whether `prepare` must run (and be awaited) before `route` for this parsed request."""
        ...

    def finish(self, routing: Routing, outcome: Outcome) -> None: ...

    def first_byte(self, routing: Routing, end_of_stream: bool = False) -> None: ...

    def abandoned(self, request: InferenceRequest) -> None:
        """The stream ended before the request was routed or refused (the client left while its body came,
        or while it waited for its data or in flow control's queue); told once."""
        ...

    def rejected(self, request: InferenceRequest | None, error: RequestError, routed: bool = False) -> None:
        """The request was refused; `routed`: after its pick (`finish` was told first, with the error)."""
        ...

    def response_metadata(
        self, routing: Routing, usage: object | None
    ) -> Mapping[str, Mapping[str, float]] | Awaitable[Mapping[str, Mapping[str, float]] | None] | None:
        """At the end of the response body: dynamic metadata for Envoy (namespace -> key -> number) from the
        response's usage (extproc.handlers.usage.Usage; None: it had none); None or empty: nothing to send.
        An awaitable (a worker's Director asks the parent) is `report_due`: the servicer awaits
        `complete_report()` before it writes the answer."""
        ...


class RequestStream:
    def __init__(
        self,
        director: Director,
        *,
        parsers: RequestParsers = DEFAULT,
        limits: RequestLimits = RequestLimits(),
        default_request_mode: int = FULL_DUPLEX,
        default_response_mode: int = FULL_DUPLEX,
        new_request_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.director = director
        self.parsers = parsers
        self.limits = limits
        self.request_mode = default_request_mode
        self.response_mode = default_response_mode
        self._new_request_id = new_request_id
        self.state = State.START
        self.request: InferenceRequest | None = None
        self.routing: Routing | None = None
        self.error: RequestError | None = None
        self._route: Route | None = None  # the parser's reading of this path; None: no parser claims it
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._header_map: base_pb2.HeaderMap | None = None
        self._header_count = 0
        self._header_bytes = 0
        self._header_bytes_exact = False
        self._subset: list[str] | None = None
        self._generated_id = False
        self._status: int | None = None
        self._usage: UsageReader | None = None
        self._capture: ResponseCapture | None = None  # --audit-response's, once the response headers came
        self._served: str | None = None
        self._restorer: ModelNameRestorer | None = None  # set when the model was rewritten
        self._finished = False
        self._pending: tuple[bytes, bool, bool] | None = None  # PREPARING: (body, trailers follow, trailers came)
        self._pending_headers: bool | None = None  # PREPARING a request with nothing to parse: its headers' end_of_stream
        # The Director picks later, elsewhere (a worker's, extproc.server.worker): every request waits in PREPARING
        self._routes_later = bool(getattr(director, "routes_later", False))
        self.report_due: tuple[pb.ProcessingResponse, Awaitable[Mapping[str, Mapping[str, float]] | None]] | None = None
        self._started = 0.0
        self._first_byte_at: float | None = None

    # -- entry points ------------------------------------------------------------------------
    def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        event = msg.WhichOneof("request")
        if self.state is State.REJECTED:
            return []
        if event is None or event not in _ALLOWED[self.state]:
            raise ProtocolError(self.state, event or "empty")
        try:
            if event == "request_headers":
                return self._on_request_headers(msg)
            if event == "request_body":
                return self._on_request_body(msg.request_body)
            if event == "request_trailers":
                return self._on_request_trailers()
            if event == "response_headers":
                return self._on_response_headers(msg)
            if event == "response_body":
                return self._on_response_body(msg.response_body)
            return self._on_response_trailers()
        except RequestError as e:
            return [self._reject(e)]

    def close(self) -> None:
        """The stream ended (normally, by client abort or error): settle the books once."""
        # A client may hang up right after `data: [DONE]`, before Envoy relays the end of stream.
        done = self.state is State.DONE or (self._usage is not None and self._usage.done)
        self._finish(aborted=not done)
        if self.routing is None and self.request is not None and self.state is not State.REJECTED and not self._finished:
            self._finished = True  # ended before it was routed or refused: the client left while its body came or it waited
            self.director.abandoned(self.request)

    @property
    def subset(self) -> list[str] | None:
        """The proxy's destination subset hint (None: any endpoint), as `route` is given it."""
        return self._subset

    @property
    def needs_data(self) -> bool:
        """The parsed request waits for the Director's data: await `director.prepare(request, self.subset)`, then `resume()`."""
        return self.state is State.PREPARING

    def resume(self) -> list[pb.ProcessingResponse]:
        """After `director.prepare`: route the request that waited in PREPARING and answer Envoy."""
        if self.state is State.PREPARING and self._pending_headers is not None:
            return self._resume_unparsed()
        if self.state is not State.PREPARING or self._pending is None:
            raise ProtocolError(self.state, "resume")
        raw, trailers_follow, trailers_came = self._pending
        self._pending = None
        try:
            out = self._route_parsed(raw, trailers_follow=trailers_follow)
        except RequestError as e:
            return [self._reject(e)]
        if trailers_came and self.state is not State.REJECTED:
            out.append(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
        return out

    def _resume_unparsed(self) -> list[pb.ProcessingResponse]:
        """`resume` for a request routed on its headers alone (nothing to parse) that waited for its pick."""
        end_of_stream, self._pending_headers = self._pending_headers, None
        assert self.request is not None
        try:
            self.routing = self.director.route(self.request, self._subset)
            self.state = State.ROUTED if end_of_stream else State.PASSTHROUGH
            return [self._headers_response(content_length=None)]
        except RequestError as e:
            return [self._reject(e)]

    def refuse(self, err: RequestError) -> list[pb.ProcessingResponse]:
        """The request is refused while it waits in PREPARING (flow control's 429/503): answer with `err`."""
        if self.state is not State.PREPARING:
            raise ProtocolError(self.state, "refuse")
        self._pending = None
        self._pending_headers = None
        return [self._reject(err)]

    @property
    def evictable(self) -> bool:
        """Routed and not answered yet: flow control may still end it (`evict`)."""
        return self.routing is not None and self.state in (State.ROUTED, State.PASSTHROUGH, State.RESPONSE_BODY)

    def evict(self) -> list[pb.ProcessingResponse]:
        """Flow control ended this in-flight request for a higher priority: 429 `evicted` (an ImmediateResponse,
        which makes Envoy reset the upstream request); the books settle as on any refusal."""
        return [self._reject(RequestError(EVICTED, "request evicted by flow control to make room for a higher priority"))]

    @property
    def pending_body(self) -> bytes | None:
        """PREPARING: the whole request body the pick waits with (None: routed on its headers alone)."""
        return self._pending[0] if self._pending is not None else None

    @property
    def request_body_bytes(self) -> int:
        """Request body bytes this stream has held: buffered to parse, or streamed back in full-duplex mode."""
        return self._body_size

    @property
    def body_idle_timeout(self) -> float | None:
        """How long the next message may take, in seconds, while the client's body is due; else None.

        Only in FULL_DUPLEX mode, where each chunk comes as the client sends it: in BUFFERED mode Envoy
        holds the body until it is complete, so a wait says nothing about the client (Envoy's own
        stream idle timeout covers it)."""
        if self.request_mode == FULL_DUPLEX and self.state in (State.REQUEST_BODY, State.PASSTHROUGH):
            return self.limits.body_idle_timeout
        return None

    def body_timed_out(self) -> list[pb.ProcessingResponse]:
        """No body chunk came within `body_idle_timeout`: refuse with 408; the books settle as on any refusal."""
        seconds = self.limits.body_idle_timeout
        return [self._reject(RequestError(REQUEST_TIMEOUT, f"no request body data for {seconds:g} s: send the body without pauses"))]

    def protocol_error_response(self, err: ProtocolError) -> pb.ProcessingResponse:
        """The answer to an out-of-order message: a 500 the client can read."""
        return self._reject(RequestError(PROTOCOL, str(err)))

    # -- request phase ------------------------------------------------------------------------
    def _on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self._started = self.clock()
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            self.request_mode = pc.request_body_mode
            self.response_mode = pc.response_body_mode
        hdrs = msg.request_headers
        headers = {h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in hdrs.headers.headers}
        self._header_map = hdrs.headers
        self._header_count = len(hdrs.headers.headers)
        # The encoded size: the names and values plus a few bytes each, computed in C. An upper bound
        # that is made exact only when it comes near the limit (_check_header_room).
        self._header_bytes = hdrs.headers.ByteSize()
        request_id = headers.get(REQUEST_ID_HEADER)
        if not request_id:
            request_id = self._new_request_id()
            self._generated_id = True
        path = headers.get(":path", "/")
        self.request = req = InferenceRequest(request_id=request_id, path=path, headers=headers)
        self._subset = _subset_hint(msg)
        self._check_header_room(1, len(DESTINATION_HEADER))  # the destination is always added
        self._route = route = self.parsers.resolve(path)
        if route is None and not hdrs.end_of_stream:
            raise self.parsers.unclaimed_error(path)
        if route is not None and route.parse is not None:
            _refuse_unparsable(headers, path, hdrs.end_of_stream, route, self.limits.max_body_bytes)
            if hdrs.end_of_stream:
                route = None  # a GET on an inference path: nothing to parse
        if route is None or route.parse is None:
            # Nothing to parse: route on load alone, and let any body stream through.
            if self._routes_later:  # a worker process: the pick is the parent's (PREPARING, then `resume`)
                self.state = State.PREPARING
                self._pending_headers = hdrs.end_of_stream
                return []
            self.routing = self.director.route(req, self._subset)
            if hdrs.end_of_stream:
                self.state = State.ROUTED
                return [self._headers_response(content_length=None)]
            self.state = State.PASSTHROUGH
            return [self._headers_response(content_length=None)]
        req.api = route.api
        self.state = State.REQUEST_BODY
        if self.request_mode == FULL_DUPLEX:
            return []  # the headers answer waits for the pick
        if self.request_mode in (BUFFERED, BUFFERED_PARTIAL):
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
        raise RequestError(
            PROTOCOL, f"request body mode {BodyMode.Name(self.request_mode)} is not supported; use FULL_DUPLEX_STREAMED or BUFFERED"
        )

    def _on_request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.state is State.PASSTHROUGH:
            if body.end_of_stream:
                self.state = State.ROUTED  # the body is all sent: no longer waiting for the client
            if self.request_mode == FULL_DUPLEX:
                chunk = body.body
                self._body_size += len(chunk)
                return [_streamed_request_body(chunk, body.end_of_stream)]
            return [pb.ProcessingResponse(request_body=pb.BodyResponse())]
        chunk = body.body
        if chunk:
            self._body_size += len(chunk)
            if self._body_size > self.limits.max_body_bytes:
                raise RequestError(PAYLOAD_TOO_LARGE, f"request body is larger than {self.limits.max_body_bytes} bytes")
            self._chunks.append(chunk)
        if not body.end_of_stream:
            return []
        return self._route_body(trailers_follow=False)

    def _on_request_trailers(self) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        if self.state is State.REQUEST_BODY:  # the body ended with trailers instead of end_of_stream
            out = self._route_body(trailers_follow=True)
            if self.state is State.REJECTED:
                return out
            if self.state is State.PREPARING:  # the trailers' answer follows the pick's (`resume`)
                assert self._pending is not None
                self._pending = (*self._pending[:2], True)
                return out
        elif self.state is State.PASSTHROUGH:
            self.state = State.ROUTED
        out.append(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
        return out

    def _route_body(self, *, trailers_follow: bool) -> list[pb.ProcessingResponse]:
        raw = b"".join(self._chunks)
        self._chunks = []
        req = self.request
        assert req is not None
        route = self._route
        assert route is not None and route.parse is not None
        route.parse(req, raw, route.required)
        if self.director.needs_data(req):
            self.state = State.PREPARING
            self._pending = (raw, trailers_follow, False)
            return []
        return self._route_parsed(raw, trailers_follow=trailers_follow)

    def _route_parsed(self, raw: bytes, *, trailers_follow: bool) -> list[pb.ProcessingResponse]:
        req = self.request
        assert req is not None
        self.routing = self.director.route(req, self._subset)
        self.state = State.ROUTED
        rewritten = bool(req.target_model) and req.target_model != req.model
        if rewritten:
            raw = rewrite_body(req.body, req.target_model)
            self._restorer = ModelNameRestorer(req.model, req.target_model)
        if self.request_mode == FULL_DUPLEX:
            out = [self._headers_response(content_length=len(raw))]
            out.extend(_streamed_chunks(raw, end=not trailers_follow))
            return out
        # BUFFERED: headers are still held by Envoy, so the body answer carries their mutation.
        resp = pb.ProcessingResponse()
        common = resp.request_body.response
        self._fill_routing(common, content_length=len(raw) if rewritten else None)
        if rewritten:
            common.body_mutation.body = raw
        return [self._with_metadata(resp)]

    # -- response phase -----------------------------------------------------------------------
    def _on_response_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        hdrs = msg.response_headers
        self._chunks = []  # an Envoy reply before the routing ends the request: its body is not needed
        streaming = json_body = False
        for h in hdrs.headers.headers:
            key = h.key
            if key == ":status":
                try:
                    self._status = int(h.raw_value or h.value)
                except ValueError:
                    self._status = None
            elif key == "content-type":
                content_type = h.raw_value or h.value.encode()
                streaming = b"text/event-stream" in content_type
                json_body = b"json" in content_type
        served = msg.metadata_context.filter_metadata.get(LB_NAMESPACE)
        if served is not None and SERVED_KEY in served.fields:
            self._served = served.fields[SERVED_KEY].string_value
        if self._status == 200:
            route = self._route
            self._usage = UsageReader(streaming, route.usage if route is not None else None)
        else:
            self._usage = None
        capture = self.routing.capture if self.routing is not None else None
        if capture is not None:
            self._capture = ResponseCapture(*capture)
        self.state = State.RESPONSE_BODY
        if hdrs.end_of_stream:
            self.state = State.DONE
            self._finish(aborted=False)
        # Write the requested model name back only where there is a body we can change and read.
        if self._restorer is not None and (hdrs.end_of_stream or self.response_mode == NONE or not (streaming or json_body)):
            self._restorer = None
        extra = self.routing.response_headers if self.routing is not None else None
        resp = pb.ProcessingResponse()
        if not extra and self._restorer is None:
            resp.response_headers.SetInParent()
            return [resp]
        mutation = resp.response_headers.response.header_mutation
        mutation.SetInParent()
        for k, v in (extra or {}).items():
            _add_header(mutation.set_headers, k, v)
        if self._restorer is not None:
            mutation.remove_headers.append("content-length")  # the name's length may differ
        return [resp]

    def _on_response_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = body.body
        if self._first_byte_at is None and chunk:
            self._first_byte_at = self.clock()
            if self.routing is not None:
                self.director.first_byte(self.routing, body.end_of_stream)
        if self._usage is not None:
            self._usage.feed(chunk, body.end_of_stream)
        if self._capture is not None:
            self._capture.feed(chunk)
        if body.end_of_stream:
            self.state = State.DONE
            self._finish(aborted=False)
        restorer = self._restorer
        if restorer is not None:
            chunk = restorer.feed(chunk, body.end_of_stream)
        if self.response_mode == FULL_DUPLEX:
            resp = _streamed_response_body(chunk, body.end_of_stream)
        elif restorer is not None:  # STREAMED or BUFFERED: the chunk (or whole body) is replaced
            resp = pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=chunk))))
        else:
            resp = pb.ProcessingResponse(response_body=pb.BodyResponse())
        if body.end_of_stream:
            self._report(resp)
        return [resp]

    def _on_response_trailers(self) -> list[pb.ProcessingResponse]:
        body_ends_here = self.state is State.RESPONSE_BODY  # no body chunk said end_of_stream
        self.state = State.DONE
        self._finish(aborted=False)
        out: list[pb.ProcessingResponse] = []
        if self._restorer is not None and self._restorer.pending and self.response_mode == FULL_DUPLEX:
            out.append(_streamed_response_body(self._restorer.flush(), False))  # a held-back tail, before the trailers
        out.append(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
        if body_ends_here:
            self._report(out[-1])
        return out

    def _report(self, resp: pb.ProcessingResponse) -> None:
        """The body ended: the Director's dynamic metadata for this response (request-attribute-reporter's)
        goes on the message that answers its end."""
        if self.routing is None:
            return
        reader = self._usage
        metadata = self.director.response_metadata(self.routing, reader.usage if reader is not None else None)
        if isinstance(metadata, Awaitable):  # a worker's Director asks the parent: the servicer awaits it
            self.report_due = (resp, metadata)
            return
        _put_metadata(resp, metadata)

    async def complete_report(self) -> None:
        """The Director's metadata came later (`report_due`): put it on the answer before it is written."""
        due, self.report_due = self.report_due, None
        if due is not None:
            resp, pending = due
            _put_metadata(resp, await pending)

    def _finish(self, *, aborted: bool) -> None:
        if self._finished or self.routing is None:
            return
        self._finished = True
        reader = self._usage
        started = self._started
        first = self._first_byte_at
        self.director.finish(
            self.routing,
            Outcome(
                status=self._status,
                streaming=bool(reader and reader.streaming),
                usage=reader.usage if reader else None,
                aborted=aborted,
                served=self._served,
                duration=self.clock() - started,
                first_byte=None if first is None else first - started,
                body_chunks=reader.chunks_seen if reader else 0,
                error=self.error,
                response=self._capture.result() if self._capture is not None else None,
            ),
        )

    # -- building answers ---------------------------------------------------------------------
    def _fill_routing(self, common: pb.CommonResponse, content_length: int | None) -> None:
        """The routing's header mutation, written into `common` in place (protobuf built field by field:
        several times cheaper than nested constructors)."""
        routing = self.routing
        assert routing is not None
        common.clear_route_cache = True
        mutation = common.header_mutation
        mutation.SetInParent()
        set_headers = mutation.set_headers
        _add_header(set_headers, DESTINATION_HEADER, routing.destination)
        request = self.request
        if self._generated_id and request is not None:
            _add_header(set_headers, REQUEST_ID_HEADER, request.request_id)
        if content_length is not None:
            _add_header(set_headers, "content-length", str(content_length))
        extra = routing.request_headers
        for key, value in extra.items():
            _add_header(set_headers, key, value)
        if request is not None:
            sent = request.headers
            for h in STEERING_HEADERS[1:]:
                if h in sent and h not in extra:
                    mutation.remove_headers.append(h)
        limits = self.limits  # upper bounds first; the exact count only near the limits
        if (
            self._header_count + len(set_headers) > limits.max_headers
            or self._header_bytes + mutation.ByteSize() > limits.max_headers_bytes
        ):
            self._check_mutation(set_headers, mutation.remove_headers)

    def _check_mutation(self, set_headers: Sequence[base_pb2.HeaderValueOption], remove: Sequence[str]) -> None:
        """Refuse (431) a mutation that would take the request past the gateway's header limits."""
        have = self.request.headers if self.request is not None else {}
        added = -len(remove)
        added_bytes = -sum(len(k) + len(have[k]) for k in remove)
        for opt in set_headers:
            key, value = opt.header.key, opt.header.raw_value
            old = have.get(key)
            if old is None:
                added += 1
                added_bytes += len(key) + len(value)
            else:
                added_bytes += len(value) - len(old)
        self._check_header_room(added, added_bytes)

    def _check_header_room(self, added: int, added_bytes: int) -> None:
        limits = self.limits
        if (count := self._header_count + added) > limits.max_headers:
            raise RequestError(
                HEADERS_TOO_LARGE,
                f"too many request headers: {count} with the gateway's own and the {added} it adds, "
                f"over its limit of {limits.max_headers}: send fewer headers",
            )
        if self._header_bytes + added_bytes > limits.max_headers_bytes and not self._header_bytes_exact:
            self._header_bytes_exact = True  # what Envoy counts: names plus values
            hs = self._header_map.headers if self._header_map is not None else ()
            self._header_bytes = sum(len(h.key) + (len(h.raw_value) or len(h.value.encode())) for h in hs)
        if (size := self._header_bytes + added_bytes) > limits.max_headers_bytes:
            raise RequestError(
                HEADERS_TOO_LARGE,
                f"request headers too large: {size} bytes of names and values with the gateway's own and the "
                f"{added_bytes} it adds, over its limit of {limits.max_headers_bytes}: send smaller headers",
            )

    def _headers_response(self, content_length: int | None) -> pb.ProcessingResponse:
        resp = pb.ProcessingResponse()
        self._fill_routing(resp.request_headers.response, content_length)
        return self._with_metadata(resp)

    def _with_metadata(self, resp: pb.ProcessingResponse) -> pb.ProcessingResponse:
        routing = self.routing
        assert routing is not None
        lb = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields
        lb[DESTINATION_HEADER].string_value = routing.destination
        if routing.scores is not None:
            lb[SCORES_KEY].string_value = routing.scores
        return resp

    def _reject(self, err: RequestError) -> pb.ProcessingResponse:
        # Keep the error, not the frames it was raised in: they hold this stream and the chunk being
        # read, a cycle that would keep a refused body in memory until the garbage collector runs.
        self.error = err.with_traceback(None)
        self.state = State.REJECTED
        self._chunks = []
        self._finish(aborted=True)
        self.director.rejected(self.request, err, routed=self.routing is not None)
        headers = [
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", raw_value=b"text/plain; charset=utf-8"))
        ]
        if err.kind.dropped_reason:
            headers.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DROPPED_REASON_HEADER, raw_value=err.kind.dropped_reason.encode())
                )
            )
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=err.kind.status),  # type: ignore[arg-type]
                headers=pb.HeaderMutation(set_headers=headers),
                body=err.body,
                details=f"llm_epp_{err.kind.code}",
            )
        )


def _refuse_unparsable(headers: Mapping[str, str], path: str, end_of_stream: bool, route: Route, max_body: int) -> None:
    """Requests to an inference path whose body the EPP could never read: refused before any body comes."""
    upgrade = headers.get("upgrade")
    if upgrade:  # Envoy would hold the stream open as a tunnel: no body would ever end
        raise RequestError(BAD_REQUEST, f"upgrading to {upgrade!r} is not supported on {path.split('?', 1)[0]}: send a plain HTTP request")
    if end_of_stream:
        if headers.get(":method", "POST") == "POST":
            raise route.empty_body_error()
        return
    route.check_path(path)
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding and encoding != "identity":
        raise RequestError(UNSUPPORTED_MEDIA_TYPE, f"request bodies with content-encoding {encoding!r} are not supported: send the JSON uncompressed")
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise RequestError(PAYLOAD_TOO_LARGE, f"request body is {length} bytes, larger than the {max_body} accepted")


def _add_header(options: RepeatedHeaders, key: str, value: str) -> None:
    """Append an overwriting header to a mutation's set_headers."""
    opt = options.add()
    header = opt.header
    header.key = key
    header.raw_value = value.encode()
    opt.append_action = _OVERWRITE


def _subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    ns = msg.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET_KEY not in ns.fields:
        return None
    value = ns.fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [v.string_value.strip() for v in value.list_value.values if v.string_value.strip()]
    if kind == "string_value":
        return [p.strip() for p in value.string_value.split(",") if p.strip()]
    return []


def filter_by_subset(candidates: Sequence[Endpoint], subset: list[str] | None) -> Sequence[Endpoint]:
    """Keep the candidates named by the subset hint (`ip` or `ip:port`); empty -> 503."""
    if subset is None:
        return candidates
    wanted = set(subset)
    kept = [ep for ep in candidates if ep.address in wanted or ep.spec.host in wanted]
    if not kept:
        raise RequestError(NO_ENDPOINTS, "no endpoint in the pool matches the destination subset hint")
    return kept


def _streamed_request_body(chunk: bytes, end: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    streamed = resp.request_body.response.body_mutation.streamed_response
    streamed.body = chunk
    streamed.end_of_stream = end
    streamed.SetInParent()  # an empty last chunk is still an answer
    return resp


def _streamed_response_body(chunk: bytes, end: bool) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    streamed = resp.response_body.response.body_mutation.streamed_response
    streamed.body = chunk
    streamed.end_of_stream = end
    streamed.SetInParent()
    return resp


def _streamed_chunks(raw: bytes, *, end: bool) -> list[pb.ProcessingResponse]:
    if not raw:
        return [_streamed_request_body(b"", end)]
    n = len(raw)
    return [_streamed_request_body(raw[i : i + STREAM_CHUNK], end and i + STREAM_CHUNK >= n) for i in range(0, n, STREAM_CHUNK)]


def _put_metadata(resp: pb.ProcessingResponse, metadata: Mapping[str, Mapping[str, float]] | None) -> None:
    if not metadata:
        return
    fields = resp.dynamic_metadata.fields
    for namespace, values in metadata.items():
        target = fields[namespace].struct_value.fields
        for key, number in values.items():
            target[key].number_value = number
