"""The endpoint datastore: the one home of live endpoint state.

Discovery sets the membership, the scraper writes each endpoint's model-server metrics (the models
poller its /v1/models list; the extractors its scalar attributes), and the request path counts its
own in-flight requests and tokens per endpoint (pick -> completion); each Endpoint also carries its
latency model fits (`Endpoint.latency`, fed by request control). A pick reads `candidates()`, a tuple rebuilt only when membership
changes, so a request costs no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from pickers.framework.columns import PoolColumns
from pickers.framework.endpoint import (
    AttributeKey,
    Endpoint,
    EndpointSpec,
    Metrics,
    ServedModels,
)

MembershipListener = Callable[[tuple[Endpoint, ...], tuple[Endpoint, ...]], None]
SpecChangeListener = Callable[[tuple[Endpoint, ...]], None]
ScrapeFailureListener = Callable[[Endpoint, str], None]


class Datastore:
    """Endpoints by address, with in-flight accounting that never goes negative or leaks."""

    def __init__(self, *, metrics_stale_after: float = 2.0) -> None:
        self.metrics_stale_after = metrics_stale_after
        self._by_address: dict[str, Endpoint] = {}
        self._candidates: tuple[Endpoint, ...] = ()
        self._columns = PoolColumns(())  # the candidates' live columns (a pick reads them whole)
        self._listeners: list[MembershipListener] = []
        self._spec_listeners: list[SpecChangeListener] = []
        self._scrape_failure_listeners: list[ScrapeFailureListener] = []
        self._metrics_listeners: list[Callable[[], None]] = []
        self.synced = False  # True once discovery delivered a first full membership

    # -- membership (discovery) ------------------------------------------------------------
    def on_membership_change(self, listener: MembershipListener) -> None:
        """`listener(added, removed)` runs after every membership change."""
        self._listeners.append(listener)

    def on_spec_change(self, listener: SpecChangeListener) -> None:
        """`listener(changed)` runs after endpoints that stayed got a new spec (labels, name, rank,
        dp group), before the membership listeners of the same update."""
        self._spec_listeners.append(listener)

    def set_endpoints(self, specs: Iterable[EndpointSpec]) -> None:
        """Replace the membership. Endpoints that stay keep their metrics and in-flight counts."""
        wanted = {s.address: s for s in specs}
        old = self._by_address
        added: list[Endpoint] = []
        changed: list[Endpoint] = []
        removed = [ep for addr, ep in old.items() if addr not in wanted]
        new: dict[str, Endpoint] = {}
        for addr, spec in wanted.items():
            ep = old.get(addr)
            if ep is None:
                ep = Endpoint(spec)
                added.append(ep)
            elif ep.spec != spec:
                ep.spec = spec  # labels, name, rank or group changed; state carries over
                changed.append(ep)
            new[addr] = ep
        self._by_address = new
        self._candidates = tuple(new.values())
        self._columns.release()
        self._columns = PoolColumns(self._candidates)
        self.synced = True
        if changed:
            for spec_listener in self._spec_listeners:
                spec_listener(tuple(changed))
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
    def on_metrics_update(self, listener: Callable[[], None]) -> None:
        """`listener()` runs after each endpoint's new metrics (flow control: room may have freed)."""
        self._metrics_listeners.append(listener)

    def update_metrics(self, address: str, metrics: Metrics) -> None:
        ep = self._by_address.get(address)
        if ep is not None:
            ep.metrics = metrics
            ep.scrape_error = None
            for listener in self._metrics_listeners:
                listener()

    def update_served_models(self, address: str, models: ServedModels) -> None:
        ep = self._by_address.get(address)
        if ep is not None and ep.served_models != models:  # an unchanged list keeps the object a pick reads
            ep.served_models = models

    def update_attributes(self, address: str, producer: str, values: Mapping[str, float], now: float) -> None:
        """`producer`'s attributes of one endpoint, by name. Others, and this producer's names not in
        `values`, keep their last values (llm-d's AttributeMap.Put). The maps are swapped whole."""
        ep = self._by_address.get(address)
        if ep is None:
            return
        attributes = dict(ep.attributes)
        for name, value in values.items():
            attributes[AttributeKey(name, producer)] = value
        ep.attributes = MappingProxyType(attributes)
        ep.attributes_updated_at = MappingProxyType({**ep.attributes_updated_at, producer: now})

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
    def acquire(self, endpoint: Endpoint, tokens: int, prefill_tokens: int = 0, requests: int = 1, output_tokens: int = 0) -> None:
        endpoint.in_flight += requests
        endpoint.in_flight_tokens += tokens
        endpoint.in_flight_prefill_tokens += prefill_tokens
        endpoint.in_flight_output_tokens += output_tokens

    def prefill_done(self, endpoint: Endpoint, prefill_tokens: int) -> None:
        """The request's first byte came back: its prompt is no longer waiting to be computed."""
        endpoint.in_flight_prefill_tokens = max(0, endpoint.in_flight_prefill_tokens - prefill_tokens)

    def release(self, endpoint: Endpoint, tokens: int, requests: int = 1, output_tokens: int = 0) -> None:
        # The endpoint object may have left the pool meanwhile; counting on it is then harmless.
        endpoint.in_flight = max(0, endpoint.in_flight - requests)
        endpoint.in_flight_tokens = max(0, endpoint.in_flight_tokens - tokens)
        if output_tokens:
            endpoint.in_flight_output_tokens = max(0, endpoint.in_flight_output_tokens - output_tokens)

    def total_in_flight(self) -> int:
        return sum(ep.in_flight for ep in self._candidates)
