"""The metrics scraping shared out over `--workers` (extproc.server.scrape_shares): the parent's split of
the endpoints, what it takes back, the IPC messages, and a worker's scraper against a real HTTP server."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.scraper import MetricsScraper
from extproc.server import ipc
from extproc.server.scrape_shares import ScrapeShare, ScrapeShares, owner
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.plugins.datalayer.extractors import DEFAULT_EXTRACTION, PoolMetricsExtraction
from pickers.plugins.datalayer.sources import DEFAULT_METRICS_SOURCE
from tests.unit.test_scraper import FakeVllm, eventually, servers  # noqa: F401 (servers: the fixture)


class FakeWorker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.sent: list[msgspec.Struct] = []

    def send(self, msg: msgspec.Struct) -> None:
        # what the worker would decode: the real encoding, both ways
        self.sent.append(ipc.worker_decoder.decode(ipc.encode(msg)[4:]))

    @property
    def share(self) -> set[str]:
        last = [m for m in self.sent if isinstance(m, ipc.Scrapes)][-1]
        return {s.address for s in last.endpoints}


def _pool(n: int) -> tuple[Datastore, MetricsScraper]:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec(f"ep{i}", f"10.0.{i // 250}.{i % 250}", 8000) for i in range(n)])
    return ds, MetricsScraper(ds, interval=0.05, timeout=0.5, max_rate=5000.0)


def _shared(n: int, workers: int) -> tuple[Datastore, MetricsScraper, ScrapeShares, list[FakeWorker]]:
    ds, scraper = _pool(n)
    shares = ScrapeShares(ds, scraper)
    joined = [FakeWorker(i) for i in range(workers)]
    for w in joined:
        shares.joined(w)
    return ds, scraper, shares, joined


def test_every_endpoint_is_scraped_by_exactly_one_worker_and_the_parent_scrapes_none() -> None:
    ds, scraper = _pool(300)
    shares = ScrapeShares(ds, scraper)
    assert scraper._delegated == frozenset()  # no worker yet: the parent scrapes all
    a, b, c = FakeWorker(0), FakeWorker(1), FakeWorker(2)
    for w in (a, b, c):
        shares.joined(w)
    everything = {ep.address for ep in ds.candidates()}
    assert a.share | b.share | c.share == everything
    assert not (a.share & b.share or a.share & c.share or b.share & c.share)
    assert all(60 < len(w.share) < 140 for w in (a, b, c)), [len(w.share) for w in (a, b, c)]
    assert scraper._delegated == everything
    msg = a.sent[-1]
    assert isinstance(msg, ipc.Scrapes)
    assert (msg.interval, msg.timeout, msg.max_rate, msg.source, msg.extraction) == (0.05, 0.5, 5000.0, DEFAULT_METRICS_SOURCE, DEFAULT_EXTRACTION)
    assert shares.scraping(a) == len(a.share)


def test_a_worker_that_leaves_hands_on_only_its_own_share_and_the_last_one_hands_all_back() -> None:
    ds, scraper, shares, (a, b, c) = _shared(200, 3)
    a_before, b_before, c_lost = set(a.share), set(b.share), set(c.share)
    shares.left(c)
    assert a_before <= a.share and b_before <= b.share  # nobody else's endpoints moved
    assert a.share | b.share == a_before | b_before | c_lost
    sends = len(a.sent)
    shares.left(FakeWorker(0))  # a stranger with a's index: not a's connection, nothing changes
    assert len(a.sent) == sends and shares.scraping(a) == len(a.share)
    restarted = FakeWorker(2)
    shares.joined(restarted)
    assert restarted.share == c_lost  # the same index gets the same share back
    shares.left(a)
    shares.left(b)
    shares.left(restarted)
    assert scraper._delegated == frozenset()  # no worker left: the parent scrapes everything again


def test_membership_and_spec_changes_reach_the_owners() -> None:
    ds, scraper, shares, (a, b) = _shared(20, 2)
    new = EndpointSpec("late", "10.9.9.9", 8000)
    ds.set_endpoints([*(ep.spec for ep in ds.candidates()), new])
    assert new.address in (a.share | b.share) and new.address in scraper._delegated
    holder = owner(new.address, [a, b])
    relabelled = EndpointSpec("late", "10.9.9.9", 8000, labels={"llm-d.ai/engine": "sglang"})
    sends = len(holder.sent)
    ds.set_endpoints([*(ep.spec for ep in ds.candidates() if ep.address != new.address), relabelled])
    assert len(holder.sent) == sends + 1
    last = holder.sent[-1]
    assert isinstance(last, ipc.Scrapes)
    assert relabelled in last.endpoints  # its engine (and so its parser) follows the label


def test_the_parent_records_only_what_the_endpoints_owner_scraped() -> None:
    ds, scraper, shares, (a, b) = _shared(10, 2)
    address = next(iter(a.share))
    m = Metrics(waiting=3, running=2, kv_usage=0.25, updated_at=time.monotonic())
    decoded = ipc.parent_decoder.decode(ipc.encode(ipc.Scraped(address, m))[4:])
    shares.take(b, decoded)  # not b's endpoint (a share moved while it was on the way): dropped
    assert ds.get(address).metrics.updated_at == 0.0
    shares.take(a, decoded)
    assert ds.get(address).metrics == m
    shares.take(a, ipc.ScrapedAttributes(address, "core-metrics-extractor", {"x": 1.5}, m.updated_at))
    assert list(ds.get(address).attributes.values()) == [1.5]
    shares.take(a, ipc.ScrapeFailed(address, "timed out after 1s"))
    assert ds.get(address).scrape_error == "timed out after 1s"


def test_the_multicluster_pool_source_is_not_shared_out() -> None:
    ds = Datastore()
    scraper = MetricsScraper(ds, extraction=PoolMetricsExtraction())
    with pytest.raises(ValueError, match="multicluster"):
        ScrapeShares(ds, scraper)


async def test_a_workers_share_scrapes_its_endpoints_and_sends_what_it_read(servers) -> None:  # noqa: F811
    one, two = await servers(), await servers()
    sent: list[msgspec.Struct] = []
    share = ScrapeShare(lambda m: sent.append(ipc.parent_decoder.decode(ipc.encode(m)[4:])))
    config = dict(interval=0.01, timeout=0.5, max_rate=None, source=DEFAULT_METRICS_SOURCE, extraction=DEFAULT_EXTRACTION)
    try:
        share.assign(ipc.Scrapes(**config, endpoints=[one.spec()]))
        await eventually(lambda: any(isinstance(m, ipc.Scraped) for m in sent))
        got = next(m for m in sent if isinstance(m, ipc.Scraped))
        assert got.address == one.spec().address
        assert (got.metrics.waiting, got.metrics.running, got.metrics.kv_usage) == (2, 1, 0.5)
        assert one.gets[0][1]  # the series filter, as the parent's scraper asks
        first = share.scraper
        share.assign(ipc.Scrapes(**config, endpoints=[two.spec()]))  # the share moved: same scraper, other endpoint
        assert share.scraper is first
        await eventually(lambda: two.hits > 0)
        await asyncio.sleep(0.05)
        hits = one.hits
        await asyncio.sleep(0.1)
        assert one.hits == hits  # no longer this worker's
        two.status = 500
        await eventually(lambda: any(isinstance(m, ipc.ScrapeFailed) for m in sent))
        assert "500" in next(m for m in sent if isinstance(m, ipc.ScrapeFailed)).error
        share.assign(ipc.Scrapes(**{**config, "interval": 0.02}, endpoints=[two.spec()]))  # a new setting: a new scraper
        assert share.scraper is not first
        share.assign(ipc.Scrapes(**{**config, "interval": 0.02}, endpoints=[]))
        await asyncio.sleep(0.05)
        hits = two.hits
        await asyncio.sleep(0.1)
        assert two.hits == hits  # an empty share scrapes nothing
    finally:
        await share.close()
