"""The endpoint datastore: the one home of live endpoint state.

Discovery sets the membership, the scraper writes each endpoint's model-server metrics, and the
request path counts its own in-flight requests and tokens per endpoint (pick -> completion). A pick
reads `candidates()`, a tuple rebuilt only when membership changes, so a request costs no copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

ROLE_LABEL = "llm-d.ai/role"


@dataclass(slots=True, frozen=True)
class EndpointSpec:
    """What discovery knows about an endpoint: where it is and how it is labelled."""

    name: str
    host: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int | None = None  # default: the serving port
    metrics_path: str = "/metrics"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port or self.port}{self.metrics_path}"


@dataclass(slots=True)
class Metrics:
    """Model-server metrics from the last successful scrape (vLLM names in SPEC section 5)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    running_lora_adapters: frozenset[str] = frozenset()
    waiting_lora_adapters: frozenset[str] = frozenset()
    max_lora: int | None = None
    prefix_cache_hits: float = 0.0
    prefix_cache_queries: float = 0.0
    updated_at: float = 0.0  # time.monotonic() of the scrape; 0 = never scraped


@dataclass(slots=True, eq=False)
class Endpoint:
    """One serving endpoint (`ip:port`) and everything the picker knows about it."""

    spec: EndpointSpec
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0
    in_flight_tokens: int = 0
    in_flight_prefill_tokens: int = 0  # uncached prompt tokens of requests not past their first byte
    scrape_error: str | None = None

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    def metrics_age(self, now: float | None = None) -> float:
        if self.metrics.updated_at == 0.0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.metrics.updated_at


MembershipListener = Callable[[tuple[Endpoint, ...], tuple[Endpoint, ...]], None]
ScrapeFailureListener = Callable[[Endpoint, str], None]


class Datastore:
    """Endpoints by address, with in-flight accounting that never goes negative or leaks."""

    def __init__(self, *, metrics_stale_after: float = 2.0) -> None:
        self.metrics_stale_after = metrics_stale_after
        self._by_address: dict[str, Endpoint] = {}
        self._candidates: tuple[Endpoint, ...] = ()
        self._listeners: list[MembershipListener] = []
        self._scrape_failure_listeners: list[ScrapeFailureListener] = []
        self.synced = False  # True once discovery delivered a first full membership

    # -- membership (discovery) ------------------------------------------------------------
    def on_membership_change(self, listener: MembershipListener) -> None:
        """`listener(added, removed)` runs after every membership change."""
        self._listeners.append(listener)

    def set_endpoints(self, specs: Iterable[EndpointSpec]) -> None:
        """Replace the membership. Endpoints that stay keep their metrics and in-flight counts."""
        wanted = {s.address: s for s in specs}
        old = self._by_address
        added: list[Endpoint] = []
        removed = [ep for addr, ep in old.items() if addr not in wanted]
        new: dict[str, Endpoint] = {}
        for addr, spec in wanted.items():
            ep = old.get(addr)
            if ep is None:
                ep = Endpoint(spec)
                added.append(ep)
            elif ep.spec != spec:
                ep.spec = spec  # labels or name changed; state carries over
            new[addr] = ep
        self._by_address = new
        self._candidates = tuple(new.values())
        self.synced = True
        if added or removed:
            for listener in self._listeners:
                listener(tuple(added), tuple(removed))

    def candidates(self) -> tuple[Endpoint, ...]:
        return self._candidates

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def __len__(self) -> int:
        return len(self._candidates)

    # -- metrics (scraper) ------------------------------------------------------------------
    def update_metrics(self, address: str, metrics: Metrics) -> None:
        ep = self._by_address.get(address)
        if ep is not None:
            ep.metrics = metrics
            ep.scrape_error = None

    def on_scrape_failure(self, listener: ScrapeFailureListener) -> None:
        """`listener(endpoint, error)` runs when an endpoint's scrapes start failing (once per outage:
        on the first failure after a success, or after it joined)."""
        self._scrape_failure_listeners.append(listener)

    def record_scrape_error(self, address: str, error: str) -> None:
        ep = self._by_address.get(address)
        if ep is not None:
            was_failing = ep.scrape_error is not None
            ep.scrape_error = error
            if not was_failing:
                for listener in self._scrape_failure_listeners:
                    listener(ep, error)

    def is_stale(self, ep: Endpoint, now: float | None = None) -> bool:
        return ep.metrics_age(now) > self.metrics_stale_after

    # -- in-flight accounting (request path) ---------------------------------------------------
    def acquire(self, endpoint: Endpoint, tokens: int, prefill_tokens: int = 0) -> None:
        endpoint.in_flight += 1
        endpoint.in_flight_tokens += tokens
        endpoint.in_flight_prefill_tokens += prefill_tokens

    def prefill_done(self, endpoint: Endpoint, prefill_tokens: int) -> None:
        """The request's first byte came back: its prompt is no longer waiting to be computed."""
        endpoint.in_flight_prefill_tokens = max(0, endpoint.in_flight_prefill_tokens - prefill_tokens)

    def release(self, endpoint: Endpoint, tokens: int) -> None:
        # The endpoint object may have left the pool meanwhile; counting on it is then harmless.
        endpoint.in_flight = max(0, endpoint.in_flight - 1)
        endpoint.in_flight_tokens = max(0, endpoint.in_flight_tokens - tokens)

    def total_in_flight(self) -> int:
        return sum(ep.in_flight for ep in self._candidates)
