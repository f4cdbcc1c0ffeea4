"""The scheduling interfaces. Each fits in a few lines; plugins implement one or more of them.

- Filter: candidates in, the candidates that may serve out (order kept).
- Scorer: a score per candidate (a list, or a numpy array aligned with the candidates: vectorised
  scorers read `cycle.columns(endpoints)`); out-of-range scores are clamped to [0, 1] by the scheduler.
- Picker: scored candidates in, the chosen endpoints out (first = primary, rest = fallbacks).
- PreRequest: told the result after a pick (e.g. the prefix index records the chosen endpoint).
- EndpointState: told when an endpoint leaves the pool (its per-endpoint state goes with it).
- ResponseStarted: told when the response's first body chunk came back (and whether it was the last).
- ResponseComplete: told when the response finished (or aborted), with the usage if known.
- ResponseReporter: at the end of a response body, values for the gateway's dynamic metadata.
- ProfileHandler: which scheduling profiles run for a request, and how their results combine.
- Screener: before everything else of the cycle, the candidates one request may use at all, for
  every profile (llm-d's requestcontrol.Screener: a rollout keeps prefill and decode on one revision).
- DataProducer: runs before the filters of every cycle and puts what it knows about the request
  on it (llm-d's PrepareRequestData: token ids, the session id).
- AsyncDataProducer: awaited before the pick, outside the cycle, for the requests it waits for
  (burst-prefix-cache-producer's batch window); what it learns goes on the request.
- CycleAdmitter: after the data producers, before the profiles, may refuse the request.
- Explainer: adds what it computed in the cycle to the scores --explain-scores shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pickers.framework.columns import EndpointColumns, columns_for
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import RequestError
from pickers.framework.request import InferenceRequest


@dataclass(slots=True)
class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle."""

    data: dict[str, object] = field(default_factory=dict)
    # The pick of an earlier profile that a later one's plugins compare candidates against (llm-d's
    # `peer-endpoint` request attribute): a P/D handler's decode pick while its prefill profile runs.
    peer: Endpoint | None = None
    # the candidates as columns (pickers.framework.columns), the scheduler's for its candidates
    endpoint_columns: EndpointColumns | None = None

    def columns(self, endpoints: Sequence[Endpoint]) -> EndpointColumns:
        """Columns of `endpoints` (the scheduler's when they are its candidates; else made and kept)."""
        c = columns_for(self.endpoint_columns, endpoints)
        self.endpoint_columns = c
        return c


@runtime_checkable
class Filter(Protocol):
    type: str
    name: str

    def filter(
        self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    type: str
    name: str
    category: str  # "affinity" (caches) or "distribution" (load)

    def score(
        self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]: ...


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@runtime_checkable
class Picker(Protocol):
    type: str
    name: str

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]: ...


@runtime_checkable
class ArrayPicker(Protocol):
    """A picker that also takes the totals as one array aligned with the candidates (no ScoredEndpoint
    per candidate); None: it cannot here (the scheduler then calls `pick`). Same choice as `pick`."""

    def pick_totals(self, request: InferenceRequest, endpoints: Sequence[Endpoint], totals: Any) -> list[Endpoint] | None: ...


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # primary first, then fallbacks
    profile: str = "default"
    # per-scorer scores of every candidate, kept only when explaining decisions
    scores: dict[str, dict[str, float]] | None = None
    # headers plugins add to the upstream request (e.g. x-prefiller-host-port) and to the response
    # the client gets (e.g. x-session-token)
    request_headers: dict[str, str] = field(default_factory=dict)
    # estimated uncached prompt tokens on the primary, when a plugin (prefill-load-scorer) knows them
    prefill_tokens: int = 0
    # estimated uncached prompt tokens on each chosen endpoint, by address, when a plugin matched the
    # prefix for them (predicted-latency-producer); the latency model's record of the pick reads it
    uncached: dict[str, int] | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    # several profiles ran (P/D): each one's chosen endpoints, by profile name; None for one profile
    profile_results: dict[str, list[Endpoint]] | None = None
    # E/P/D: the encode profile's picks (x-encoder-hosts-ports), which compute the request's multimodal
    # embeddings; kept apart from profile_results, as they hold none of its KV. None: no encode stage
    encoders: list[Endpoint] | None = None
    # set by an inflight-load-producer: what the request adds to each chosen endpoint's in-flight
    # counts; None: the EPP's default (one request and prompt + max_tokens on the primary, to the end)
    in_flight: list[InFlightCharge] | None = None
    # a data-parallel handler's primaryPort: the proxy is sent to each chosen endpoint's host at this
    # port (a sidecar there forwards to the rank named in x-data-parallel-host-port); the chosen rank
    # endpoints keep the accounting, the prefix index and the metrics. 0: to the endpoints themselves.
    destination_port: int = 0

    def destination(self) -> str:
        """What the proxy is told (`x-gateway-destination-endpoint`): `ip:port`, primary first."""
        port = self.destination_port
        eps = self.endpoints
        if port:
            return ",".join(f"{ep.spec.host}:{port}" for ep in eps)
        return eps[0].address if len(eps) == 1 else ",".join(ep.address for ep in eps)


@dataclass(slots=True)
class InFlightCharge:
    """What one request adds to one endpoint's in-flight counts, and when each part comes off:
    `early_tokens` at the response's first byte, `tokens` and the request (when `requests`) at its end;
    `early_request`: the request itself comes off at the first byte (a prefill endpoint's job is done)."""

    endpoint: Endpoint
    tokens: int = 0
    early_tokens: int = 0
    requests: int = 1
    early_request: bool = False


@runtime_checkable
class Screener(Protocol):
    """Narrows the candidates before the data producers and every profile run (llm-d's Screener): the
    endpoints of `endpoints` this request may use, in their order. `pool` is the whole pool (the
    datastore's tuple, the same object until membership changes; `endpoints` is it or a subset-hint
    part of it), for what a screener computes over the pool. Every screener sees the same input and
    the scheduler keeps what all of them kept; none kept is 503. A screener may raise RequestError to
    refuse with its own reason."""

    type: str
    name: str

    def screen(self, request: InferenceRequest, endpoints: Sequence[Endpoint], pool: Sequence[Endpoint]) -> Sequence[Endpoint]: ...


@runtime_checkable
class DataProducer(Protocol):
    type: str
    name: str

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class AsyncDataProducer(Protocol):
    """A data producer that must wait before the request is scheduled (llm-d's blocking Produce, e.g.
    burst-prefix-cache-producer's batch window). The EPP awaits `produce_async` for each request
    `waits_for` says, after the token-producer and before flow control and the pick, with the
    candidates the request may go to; what it learns goes on the request (`attributes`), never in
    the cycle, which does not exist yet. A cancelled wait (the client left) must leave no trace.
    `close` (the EPP stopping) lets every waiting request go at once."""

    type: str
    name: str

    def waits_for(self, request: InferenceRequest) -> bool: ...

    async def produce_async(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None: ...

    def close(self) -> None: ...


ENDPOINT_NOTIFICATION_SOURCE = "endpoint-notification-source"


@runtime_checkable
class EndpointExtractor(Protocol):
    """llm-d's EndpointExtractor: a plugin that follows the pool's endpoints as they come and go, named
    as an extractor of a data source in `dataLayer.sources[].extractors`. `extracts(source type)` says
    which sources it takes (precise-prefix-cache-producer: an endpoint-notification-source, whose
    endpoints it subscribes to for KV events). The EPP feeds it from its datastore whether or not the
    config names it there."""

    type: str
    name: str

    def extracts(self, source_type: str) -> bool: ...


@runtime_checkable
class EndpointState(Protocol):
    """A plugin that keeps per-endpoint state of its own (mm-embeddings-cache-producer's LRUs): the EPP
    calls `remove_endpoint` when an endpoint leaves the pool, so that state goes with it."""

    def remove_endpoint(self, address: str) -> None: ...


@runtime_checkable
class PreRequest(Protocol):
    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None: ...


@runtime_checkable
class Admitter(Protocol):
    """Admission before scheduling (llm-d's requestcontrol.Admitter): raise RequestError to refuse the
    request, return to let it through. Runs once per request, before flow control's queues."""

    def admit_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class CycleAdmitter(Protocol):
    """Admission inside the cycle, after the data producers ran and before the profiles (llm-d's order:
    flow control, Produce, Admit, then scheduling): raise RequestError to refuse, return to admit."""

    def admit_cycle(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None: ...


@runtime_checkable
class Explainer(Protocol):
    """A plugin whose per-endpoint numbers (key -> address -> value) --explain-scores shows with the scores."""

    def explain(self, cycle: CycleState) -> Mapping[str, Mapping[str, float]]: ...


@runtime_checkable
class ResponseStarted(Protocol):
    """llm-d's ResponseBodyProcessor at the start of the stream: the first body chunk of the response to
    `request` came back from `endpoint` (the primary pick); `end_of_stream`: that chunk was also its last
    (a response not streamed)."""

    def response_started(self, request: InferenceRequest, endpoint: Endpoint, end_of_stream: bool) -> None: ...


@runtime_checkable
class ResponseComplete(Protocol):
    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None: ...


@runtime_checkable
class ResponseReporter(Protocol):
    """llm-d's ResponseBodyProcessor at the end of the body: once per response whose body ends (not on
    an abort), given the usage object as llm-d's plugins see it (prompt_tokens, completion_tokens and
    total_tokens, 0 when the response had none; prompt_tokens_details.cached_tokens when the server sent
    details), it may write numbers into `metadata` (namespace -> key -> value), which go back to the
    gateway as ext_proc dynamic metadata on the message that ends the body."""

    def report_response(self, usage: Mapping[str, object], metadata: dict[str, dict[str, float]]) -> None: ...


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass(slots=True)
class SchedulingProfile:
    """Filters + weighted scorers + one picker, run as one cycle over the candidates."""

    name: str
    picker: Picker
    scorers: list[WeightedScorer] = field(default_factory=list)
    filters: list[Filter] = field(default_factory=list)

    def plugins(self) -> list[object]:
        return [*self.filters, *(w.scorer for w in self.scorers), self.picker]


# One profile's outcome: the endpoints it chose, or why it chose none.
ProfileOutcome = list[Endpoint] | RequestError

# The handler of a config with one profile; the scheduler runs that profile inline, without handler calls.
SINGLE_PROFILE_HANDLER = "single-profile-handler"


@runtime_checkable
class ProfileHandler(Protocol):
    type: str
    name: str

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        """Resolve plugin and profile names once the config is built; ParameterError names the parameter."""
        ...

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        """The profiles to run next, given those that ran; an empty list ends the cycle."""
        ...

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        """One result from all profiles' outcomes; raises the RequestError when the request cannot be served."""
        ...


@runtime_checkable
class PeerPublisher(Protocol):
    """A profile handler that sets `CycleState.peer` before it runs some of its profiles."""

    def peer_profiles(self) -> tuple[str, ...]:
        """The profiles that run with a peer (the names as configured; they may not exist)."""
        ...


class DurationObserver(Protocol):
    def observe(self, seconds: float) -> None: ...


# (extension point "Filter" | "Scorer" | "Picker", plugin) -> where that plugin's call durations go
PluginTimer = Callable[[str, object], DurationObserver]
