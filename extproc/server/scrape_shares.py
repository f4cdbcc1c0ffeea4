"""The metrics scraping of `epp serve --workers N`, shared out over the workers (docs/scaling.md).

One process scrapes at most `--max-scrape-rate` pages a second (about half a core with the series
filter), and at 1,000 endpoints the 50 ms interval asks for 20,000. With workers, each scrapes a share
of the endpoints and the parent, which keeps the datastore, only records what they read:

- `ScrapeShares` (the parent) gives each connected worker its share: every endpoint goes to the worker
  whose index ranks highest for its address (rendezvous hashing: a worker that comes or goes moves only
  its own share). It sends a worker `ipc.Scrapes` whenever that share or its endpoints' specs change,
  records what comes back (`take`) only from the endpoint's current owner, and tells its own metrics
  scraper to leave the shared endpoints alone. Before the first worker says hello, and while none is
  connected, the parent scrapes every endpoint itself: metrics never go unscraped while workers restart.
- `ScrapeShare` (a worker) stands in for the datastore under the very MetricsScraper the parent would
  run (the same source, extraction, series filter and rate cap: the cap applies in each process), and
  sends what the scraper records to the parent instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import msgspec
import xxhash

from extproc.datalayer.datastore import Datastore, MembershipListener
from extproc.datalayer.scraper import MetricsScraper
from extproc.server import ipc
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.plugins.datalayer.extractors import MetricsExtraction

log = logging.getLogger(__name__)


class Worker(Protocol):
    """A worker's connection as the parent sees it (workers._Conn)."""

    index: int

    def send(self, msg: msgspec.Struct) -> None: ...


def owner(address: str, workers: list[Any]) -> Any:
    """The worker that scrapes this endpoint: the highest `xxh3(index address)` among the workers."""
    return max(workers, key=lambda w: xxhash.xxh3_64_intdigest(f"{w.index} {address}".encode()))


class ScrapeShares:
    """The parent's side: which worker scrapes which endpoint, and what they read, into the datastore."""

    def __init__(self, datastore: Datastore, scraper: MetricsScraper) -> None:
        if not isinstance(scraper.extraction, MetricsExtraction):
            raise ValueError("only a model-server metrics scraper is shared out (not the multicluster pool source)")
        self.datastore = datastore
        self.scraper = scraper
        self._workers: dict[int, Worker] = {}  # by index: a restarted worker replaces its predecessor
        self._owner: dict[str, Worker] = {}  # address -> the worker scraping it
        self._sent: dict[int, list[EndpointSpec]] = {}  # what each worker was last given
        datastore.on_membership_change(lambda added, removed: self.rebalance())
        datastore.on_spec_change(lambda changed: self.rebalance())

    def joined(self, worker: Worker) -> None:
        self._workers[worker.index] = worker
        self._sent.pop(worker.index, None)
        self.rebalance()

    def left(self, worker: Worker) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
            self._sent.pop(worker.index, None)
            self.rebalance()

    def scraping(self, worker: Worker) -> int:
        """How many endpoints this worker scrapes now."""
        return len(self._sent.get(worker.index, ())) if self._workers.get(worker.index) is worker else 0

    def rebalance(self) -> None:
        workers = list(self._workers.values())
        shares: dict[int, list[EndpointSpec]] = {w.index: [] for w in workers}
        owners: dict[str, Worker] = {}
        if workers:
            for ep in self.datastore.candidates():
                w = owner(ep.address, workers)
                owners[ep.address] = w
                shares[w.index].append(ep.spec)
        self._owner = owners
        s = self.scraper
        for w in workers:
            specs = shares[w.index]
            if self._sent.get(w.index) != specs:
                self._sent[w.index] = specs
                w.send(ipc.Scrapes(s.interval, s.timeout, s.max_rate, s.source, cast(MetricsExtraction, s.extraction), specs))
        s.delegate(frozenset(owners))

    def take(self, worker: Worker, msg: ipc.Scraped | ipc.ScrapedAttributes | ipc.ScrapeFailed) -> None:
        """Record a worker's scrape, if the endpoint is still its to scrape (a share moves while scrapes are on the way)."""
        if self._owner.get(msg.address) is not worker:
            return
        kind = type(msg)
        if kind is ipc.Scraped:
            self.datastore.update_metrics(msg.address, msg.metrics)  # type: ignore[union-attr]
        elif kind is ipc.ScrapedAttributes:
            self.datastore.update_attributes(msg.address, msg.producer, msg.values, msg.at)  # type: ignore[union-attr]
        else:
            self.datastore.record_scrape_error(msg.address, msg.error)  # type: ignore[union-attr]


class ScrapeShare:
    """A worker's side: the endpoints the parent gave it, as the datastore its MetricsScraper reads,
    and what that scraper records, sent to the parent."""

    def __init__(self, send: Callable[[msgspec.Struct], None]) -> None:
        self._send = send
        self._by_address: dict[str, Endpoint] = {}
        self._candidates: tuple[Endpoint, ...] = ()
        self._listeners: list[MembershipListener] = []
        self._config: tuple[object, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self.scraper: MetricsScraper | None = None

    # -- the datastore's side that MetricsScraper uses ---------------------------------------
    def candidates(self) -> tuple[Endpoint, ...]:
        return self._candidates

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def on_membership_change(self, listener: MembershipListener) -> None:
        self._listeners.append(listener)

    def update_metrics(self, address: str, metrics: Metrics) -> None:
        self._send(ipc.Scraped(address, metrics))

    def update_attributes(self, address: str, producer: str, values: dict[str, float], now: float) -> None:
        self._send(ipc.ScrapedAttributes(address, producer, dict(values), now))

    def record_scrape_error(self, address: str, error: str) -> None:
        self._send(ipc.ScrapeFailed(address, error))

    # -- the parent's messages -----------------------------------------------------------------
    def assign(self, msg: ipc.Scrapes) -> None:
        """Scrape this share from now on (a new scraper when the source or its settings changed)."""
        config = (msg.interval, msg.timeout, msg.max_rate, msg.source, msg.extraction)
        if config != self._config:
            self.stop()
            self._config = config
            self._listeners.clear()  # the stopped scraper's
            self._by_address, self._candidates = {}, ()
            self.scraper = MetricsScraper(
                cast(Datastore, self), interval=msg.interval, timeout=msg.timeout, source=msg.source,
                extraction=msg.extraction, max_rate=msg.max_rate,
            )  # fmt: skip
            self._task = asyncio.get_running_loop().create_task(self.scraper.run(), name="metrics-scraper (share)")
        old = self._by_address
        new: dict[str, Endpoint] = {}
        for spec in msg.endpoints:
            ep = old.get(spec.address)
            new[spec.address] = ep if ep is not None and ep.spec == spec else Endpoint(spec)
        added = [ep for a, ep in new.items() if old.get(a) is not ep]
        removed = [ep for a, ep in old.items() if new.get(a) is not ep]
        self._by_address, self._candidates = new, tuple(new.values())
        if added or removed:
            log.debug("scraping %d endpoints (+%d, -%d)", len(new), len(added), len(removed))
            for listener in list(self._listeners):
                listener(added, removed)

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
