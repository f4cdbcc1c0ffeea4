"""Flow control's contracts (llm-d's, in Python): what the policies see and what the EPP's queues offer.

The policies (pickers/plugins/flowcontrol/) are pure: they order items, pick a flow in a band, turn
pool saturation into per-band ceilings, and choose what to evict. The runtime that holds requests
(extproc/flowcontrol/) owns the queues and calls them. A request belongs to one flow: its fairness id
(`x-gateway-inference-fairness-id`, default `default-flow`) within its priority (the InferenceObjective's).
Higher priority numbers dispatch first; negative priorities are sheddable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest

DEFAULT_FLOW_ID = "default-flow"
# llm-d reads the current name first, then its deprecated alias (metadata.headerAliases)
FAIRNESS_ID_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


@dataclass(slots=True, frozen=True, order=True)
class FlowKey:
    """One flow: a fairness id within a priority band."""

    priority: int
    id: str

    def __str__(self) -> str:
        return f"{self.id}:{self.priority}"


@runtime_checkable
class QueueItem(Protocol):
    """A request waiting in a flow's queue (times are time.monotonic() seconds)."""

    @property
    def request_id(self) -> str: ...
    @property
    def flow(self) -> FlowKey: ...
    @property
    def request(self) -> InferenceRequest: ...
    @property
    def byte_size(self) -> int: ...
    @property
    def received_at(self) -> float: ...  # when the EPP got the request
    @property
    def enqueued_at(self) -> float: ...
    @property
    def ttl(self) -> float: ...  # seconds it may wait; 0 = no limit


@runtime_checkable
class FlowQueue(Protocol):
    """One flow's queue, as fairness policies see it: ordered by the band's ordering policy."""

    @property
    def flow(self) -> FlowKey: ...
    def __len__(self) -> int: ...
    @property
    def byte_size(self) -> int: ...
    def head(self) -> QueueItem | None: ...  # the item the ordering policy dispatches next


@runtime_checkable
class PriorityBand(Protocol):
    """The flows of one priority, as fairness policies see them."""

    @property
    def priority(self) -> int: ...
    def flows(self) -> Sequence[FlowKey]: ...  # flows that have a queue (maybe empty), in a stable order
    def queue(self, flow_id: str) -> FlowQueue | None: ...
    def queues(self) -> Iterator[FlowQueue]: ...
    @property
    def policy_state(self) -> Any: ...  # what the band's fairness policy's new_state() returned
    @property
    def ordering(self) -> OrderingPolicy: ...  # the band's ordering policy (global-strict compares heads with it)


# -- policies (plugins) ----------------------------------------------------------------------------


@runtime_checkable
class OrderingPolicy(Protocol):
    """Order within a flow: the item with the smallest key dispatches first (ties: arrival order)."""

    type: str
    name: str

    def key(self, item: QueueItem) -> Any: ...


@runtime_checkable
class FairnessPolicy(Protocol):
    """Which flow of a band dispatches next; None when no flow has an item."""

    type: str
    name: str

    def new_state(self) -> Any: ...  # per-band state (e.g. a round-robin cursor), kept by the runtime
    def pick(self, band: PriorityBand) -> FlowQueue | None: ...


@runtime_checkable
class SaturationDetector(Protocol):
    """How full the pool is: 0 = idle, >= 1.0 = saturated (no room to dispatch)."""

    type: str
    name: str

    def saturation(self, endpoints: Sequence[Endpoint]) -> float: ...


@runtime_checkable
class UsageLimitPolicy(Protocol):
    """Per-band ceilings on saturation: a band may dispatch while pool saturation < its ceiling.

    `priorities` is in descending order; returns one ceiling per priority (1.0 = the detector's own limit).
    """

    type: str
    name: str

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]: ...


@dataclass(slots=True)
class EvictionItem:
    """An in-flight (dispatched) request that could be evicted to make room for a higher priority."""

    request_id: str
    priority: int
    dispatched_at: float  # time.monotonic()
    address: str  # the endpoint serving it
    request: InferenceRequest
    evict: Callable[[], None] = field(repr=False, default=lambda: None)  # ends the request (the runtime's)


@runtime_checkable
class EvictionFilterPolicy(Protocol):
    type: str
    name: str

    def accept(self, item: EvictionItem) -> bool: ...


@runtime_checkable
class EvictionOrderingPolicy(Protocol):
    """The item with the smallest key is evicted first."""

    type: str
    name: str

    def key(self, item: EvictionItem) -> Any: ...


def explicit_fairness_id(request: InferenceRequest) -> str:
    """The fairness id a client names (FAIRNESS_ID_HEADERS, first present wins), else "" (not named)."""
    headers = request.headers
    for name in FAIRNESS_ID_HEADERS:
        value = headers.get(name)
        if value is not None:
            return value
    return ""


def fairness_id_from_headers(request: InferenceRequest) -> str:
    """The request's flow id without agent-identity: the explicit header, else DEFAULT_FLOW_ID."""
    return explicit_fairness_id(request) or DEFAULT_FLOW_ID


# -- the configuration the loader builds -------------------------------------------------------------

DEFAULT_REQUEST_TTL = 60.0  # seconds
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 1_000_000_000  # 1G


@dataclass(slots=True, frozen=True)
class BandConfig:
    priority: int
    max_requests: int
    max_bytes: int
    fairness: FairnessPolicy
    ordering: OrderingPolicy


@dataclass(slots=True, frozen=True)
class FlowControlConfig:
    """The `flowControl` section with every default filled in and every reference resolved.

    Bands for priorities not listed are made from `default_band` (or `default_negative_band` below 0)
    with the priority filled in.
    """

    enabled: bool  # the flowControl feature gate
    bands: tuple[BandConfig, ...]  # explicitly configured, by priority descending
    default_band: BandConfig  # template: priority is replaced
    default_negative_band: BandConfig
    max_requests: int  # global; 0 = no global limit
    max_bytes: int  # global; 0 = no global limit
    default_request_ttl: float  # seconds; 0 = wait until the client goes away
    no_endpoint_request_ttl: float  # seconds, while the pool has no endpoint
    saturation_detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    enable_eviction: bool
    eviction_filter: EvictionFilterPolicy | None = None
    eviction_order: EvictionOrderingPolicy | None = None
    # the request's flow id: explicit header, then agent-identity's session headers (when the config
    # declares one), then DEFAULT_FLOW_ID; the runtime calls it once per request
    fairness_id: Callable[[InferenceRequest], str] = fairness_id_from_headers

    def band(self, priority: int) -> BandConfig:
        """The band a request of `priority` joins: the configured one, else the default template
        (the negative one below 0) with `priority` filled in. O(bands); the runtime caches per priority."""
        for b in self.bands:
            if b.priority == priority:
                return b
        template = self.default_negative_band if priority < 0 else self.default_band
        return replace(template, priority=priority)
