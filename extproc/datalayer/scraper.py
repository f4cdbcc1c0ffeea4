"""Model-server metrics: scrape each endpoint's Prometheus `/metrics` and write the datastore.

One polling task per endpoint (a slow or dead endpoint only delays itself), one shared keep-alive
HTTP session, a timeout per scrape. Picks never wait for a scrape; they judge staleness with
`Datastore.is_stale`. Which series are read is the endpoint's engine mapping (vLLM, SGLang, TensorRT-LLM,
...: pickers.plugins.datalayer.extractors), chosen by its `llm-d.ai/engine-type` label, and its
customMetrics become the endpoint's attributes; where to scrape is the `metrics-data-source` (scheme,
path, port, TLS, interval). A peer cluster's pool aggregates (`multicluster-metrics-extractor`) are read
by `PoolMetricsParser` instead. `EndpointPoller` is the polling loop shared with the /v1/models poller
(extproc.datalayer.models) and the DCGM scraper (extproc.datalayer.dcgm), `SampleFinder` the
Prometheus text reading shared with the latter.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol
from urllib.parse import urlencode

import aiohttp
import xxhash

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.http_get import HttpGetError, HttpGetter
from pickers.framework.endpoint import Endpoint, Metrics
from pickers.framework.errors import ConfigError
from pickers.plugins.datalayer.attributes import CORE_METRICS_PRODUCER
from pickers.plugins.datalayer.extractors import (
    BUILTIN_ENGINES,
    DEFAULT_EXTRACTION,
    EngineMetrics,
    MetricsExtraction,
    MetricSpec,
    PoolMetricsExtraction,
)
from pickers.plugins.datalayer.sources import DEFAULT_METRICS_SOURCE, HttpSource

log = logging.getLogger(__name__)


class ScrapeError(Exception):
    """A scrape that produced no fresh data (bad status, unusable body)."""


class MetricsParseError(ScrapeError, ValueError):
    """A metrics body that does not carry the gauges a pick needs."""


class HttpStatusError(ScrapeError):
    """An answer other than 200."""

    def __init__(self, status: int, url: str) -> None:  # url: the source's, without the series filter's query
        super().__init__(f"HTTP {status} from {url}")
        self.status = status


# After a wanted metric's name: optional {labels} (quoted values may hold escaped quotes, braces and
# commas), the value, an optional timestamp, then anything (an OpenMetrics exemplar). Each pattern is
# matched on "\n" + text so the engine's literal-prefix search skips everything else (~8x faster than ^/M).
# The label text and a quoted value are "unrolled loops" (plain characters, then each quoted part or
# escape followed by plain characters again, all possessive): one step per label instead of one per
# plain run and quoted value, half the time on vLLM's ~40 cache-config labels.
_QUOTED = r"\"[^\"\\\n]*+(?:\\.[^\"\\\n]*+)*+\""
_SAMPLE_TAIL = (
    r"[ \t]*(?:\{([^\"}\n]*+(?:" + _QUOTED + r"[^\"}\n]*+)*+)\})?[ \t]*[ \t]([^ \t\r\n]+)(?:[ \t]+([^ \t\r\n#]+))?"
)
_LABEL = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*\"([^\"\\\n]*+(?:\\.[^\"\\\n]*+)*+)\"[ \t]*,?")
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}
_COUNTS = frozenset({"queued", "running"})
_ROLES = (
    "queued", "running", "kv_usage", "kv_usage_fallback", "lora", "cache_info", "cache_block_size",
    "cache_num_blocks", "prefix_cache_hits", "prefix_cache_queries",
)  # fmt: skip


def labels_of(text: str | None) -> dict[str, str]:
    """A sample's `{...}` label text (as SampleFinder gives it) as a mapping, escapes decoded."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for m in _LABEL.finditer(text):
        value = m.group(2)
        if "\\" in value:
            value = _ESCAPE.sub(lambda e: _UNESCAPED.get(e.group(1), "\\" + e.group(1)), value)
        out[m.group(1)] = value
    return out


class SampleFinder:
    """Finds the samples of some metric names in a Prometheus text body, and only those: each match's
    groups are (the name less the names' common prefix, the label text or None, the value text, the
    timestamp text or None). `key(name)` is what the first group is for `name`."""

    def __init__(self, names: Iterable[str]) -> None:
        ordered = sorted(set(names), key=len, reverse=True)  # longest first: one name may prefix another
        self.prefix = os.path.commonprefix(ordered) if ordered else ""
        alternatives = "|".join(re.escape(self.key(n)) for n in ordered)
        self._pattern = (
            re.compile(r"\n[ \t]*" + re.escape(self.prefix) + "(" + alternatives + ")" + _SAMPLE_TAIL) if ordered else None
        )

    def key(self, name: str) -> str:
        return name[len(self.prefix) :]

    def samples(self, text: str) -> Iterator[re.Match[str]]:
        if self._pattern is None:
            return iter(())
        return self._pattern.finditer("\n" + text)


def finite(raw: str) -> float | None:
    """A sample's value, or None when it is not a finite number (NaN, Inf and garbage are skipped)."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int_label(labels: dict[str, str], name: str) -> int | None:
    raw = labels.get(name, "")
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        return None
    return value if value >= 0 else None


def _adapters(raw: str | None) -> frozenset[str]:
    if not raw:
        return frozenset()
    return frozenset(a for a in (p.strip() for p in raw.split(",")) if a)


class MetricsParser:
    """Reads one engine's series from Prometheus text into Metrics (updated_at left at 0), and its
    customMetrics into attribute values.

    Several series of one metric (data-parallel `engine` ranks, several `model_name`s) are summed for
    counts and averaged for KV usage; a selector's labels must all match. A custom metric is one series,
    as llm-d reads it: of those matching, the one with the newest timestamp, else the first. NaN/Inf
    samples and unparsable lines are ignored. Raises MetricsParseError when the engine's queue, running
    or KV usage series (those it defines) has no usable sample.
    """

    def __init__(self, engine: EngineMetrics) -> None:
        self.engine = engine
        roles: dict[str, list[tuple[str, MetricSpec]]] = {}
        for role in _ROLES:
            spec: MetricSpec | None = getattr(engine, role)
            if spec is not None:
                roles.setdefault(spec.name, []).append((role, spec))
        custom: dict[str, list[tuple[str, MetricSpec]]] = {}
        for c in engine.custom:
            custom.setdefault(c.spec.name, []).append((c.attribute_key, c.spec))
        self.names = tuple(sorted({*roles, *custom}))  # every metric name it reads
        self._finder = SampleFinder(self.names)
        key = self._finder.key
        self._roles = {key(name): tuple(r) for name, r in roles.items()}
        self._custom = {key(name): tuple(c) for name, c in custom.items()}
        self._required = tuple(
            (role, spec) for role in ("queued", "running", "kv_usage") if (spec := getattr(engine, role)) is not None
        )
        self._cache_infos: dict[str, tuple[int | None, int | None]] = {}  # see _cache_info

    def parse(self, text: str) -> Metrics:
        return self.parse_with_attributes(text)[0]

    def _cache_info(self, label_text: str) -> tuple[int | None, int | None]:
        """(blocks, block size) from a cache-info series' labels. The series carries the engine's whole
        cache config (~40 labels, ~1 KB) and is the same scrape after scrape: read once per distinct text."""
        known = self._cache_infos.get(label_text)
        if known is None:
            labels = labels_of(label_text)
            known = (_int_label(labels, self.engine.cache_num_blocks_label), _int_label(labels, self.engine.cache_block_size_label))
            if len(label_text) <= 8192:  # at most 1,024 of them kept (~1 KB each); a body's longer ones are read every time
                if len(self._cache_infos) >= 1024:  # endpoints' configs come and go
                    self._cache_infos.clear()
                self._cache_infos[label_text] = known
        return known

    def parse_with_attributes(self, text: str) -> tuple[Metrics, dict[str, float]]:
        """The metrics, and the custom metrics found (by attribute key; one not found is left out)."""
        sums = dict.fromkeys(_ROLES, 0.0)
        counts = dict.fromkeys(_ROLES, 0)
        block_size: int | None = None
        num_blocks: int | None = None
        lora_labels: dict[str, str] | None = None
        lora_newest = -math.inf
        custom: dict[str, float] = {}
        custom_newest: dict[str, float] = {}
        engine = self.engine
        no_roles: tuple[tuple[str, MetricSpec], ...] = ()
        for m in self._finder.samples(text):
            suffix, label_text, raw_value, raw_ts = m.groups()
            value = finite(raw_value)
            if value is None:
                continue
            labels: dict[str, str] | None = None
            for key, spec in self._custom.get(suffix, no_roles):
                if spec.labels:
                    if labels is None:
                        labels = labels_of(label_text)
                    if not spec.matches(labels):
                        continue
                ts = _timestamp(raw_ts)
                if ts > custom_newest.get(key, -1.0):  # llm-d's getLatestMetric: the first of the newest
                    custom_newest[key] = ts
                    custom[key] = value
            for role, spec in self._roles.get(suffix, no_roles):
                if spec.labels:
                    if labels is None:
                        labels = labels_of(label_text)
                    if not spec.matches(labels):
                        continue
                if role == "cache_info":
                    blocks, size = self._cache_info(label_text or "")
                    if blocks is not None:  # one series per engine rank: the endpoint holds them all
                        num_blocks = blocks + (num_blocks or 0)
                    if block_size is None:
                        block_size = size
                elif role == "lora":
                    if value > lora_newest:  # the value is a timestamp: the newest series wins
                        lora_newest = value
                        lora_labels = labels_of(label_text) if labels is None else labels
                elif role == "cache_block_size":
                    if block_size is None and value >= 1:
                        block_size = int(min(value, 1e9))
                elif role == "cache_num_blocks":
                    if value >= 0:
                        num_blocks = int(min(value, 1e15)) + (num_blocks or 0)
                else:
                    if role in _COUNTS:
                        value = min(max(value, 0.0), 1e12)  # sums stay finite whatever the body says
                    sums[role] += value
                    counts[role] += 1

        missing = [
            str(spec)
            for role, spec in self._required
            if counts[role] == 0 and not (role == "kv_usage" and counts["kv_usage_fallback"])
        ]
        if missing:
            raise MetricsParseError(f"no usable sample of {', '.join(missing)}")

        if counts["kv_usage"]:
            kv = sums["kv_usage"] / counts["kv_usage"]
        elif counts["kv_usage_fallback"]:
            kv = sums["kv_usage_fallback"] / counts["kv_usage_fallback"]
        else:
            kv = 0.0
        metrics = Metrics(
            waiting=max(0, round(sums["queued"])),
            running=max(0, round(sums["running"])),
            kv_usage=min(1.0, max(0.0, kv)),
            block_size=block_size or None,
            num_gpu_blocks=num_blocks,
            prefix_cache_hits=sums["prefix_cache_hits"],
            prefix_cache_queries=sums["prefix_cache_queries"],
        )
        if lora_labels is not None:
            metrics.running_lora_adapters = _adapters(lora_labels.get("running_lora_adapters"))
            metrics.waiting_lora_adapters = _adapters(lora_labels.get("waiting_lora_adapters"))
            metrics.max_lora = _int_label(lora_labels, "max_lora")
        return metrics, custom


def _timestamp(raw: str | None) -> float:
    """A sample's timestamp (ms in Prometheus text); 0 when it has none, as Go's parser reads it."""
    if raw is None:
        return 0.0
    ts = finite(raw)
    return ts if ts is not None else 0.0


class PoolMetricsParser:
    """Reads a peer cluster's pool aggregates (its EPP's mean KV-cache use and mean waiting queue) into
    Metrics: `pool_kv_usage` and `pool_queue`, and the same numbers as `kv_usage` and `waiting` (rounded).

    Several matching series (one per pool of the peer's EPP) are averaged. NaN/Inf samples are ignored.
    Raises MetricsParseError when either gauge has no usable sample: a peer EPP exports them only while
    its pool has endpoints with fresh metrics, so a cluster without them is not offered as idle.
    """

    def __init__(self, extraction: PoolMetricsExtraction) -> None:
        self.specs = (extraction.kv_usage, extraction.queue)
        self.names = tuple(sorted({spec.name for spec in self.specs}))  # every metric name it reads
        self._finder = SampleFinder(self.names)
        self._keys = tuple(self._finder.key(spec.name) for spec in self.specs)

    def parse(self, text: str) -> Metrics:
        sums = [0.0, 0.0]
        counts = [0, 0]
        for m in self._finder.samples(text):
            suffix, label_text, raw_value, _ = m.groups()
            value = finite(raw_value)
            if value is None:
                continue
            labels: dict[str, str] | None = None
            for i, spec in enumerate(self.specs):
                if self._keys[i] != suffix:
                    continue
                if spec.labels:
                    labels = labels_of(label_text) if labels is None else labels
                    if not spec.matches(labels):
                        continue
                sums[i] += value
                counts[i] += 1
        missing = [str(spec) for spec, n in zip(self.specs, counts, strict=True) if n == 0]
        if missing:
            raise MetricsParseError(f"no usable sample of {', '.join(missing)}")
        kv = min(1.0, max(0.0, sums[0] / counts[0]))
        queue = min(max(sums[1] / counts[1], 0.0), 1e12)
        return Metrics(waiting=round(queue), kv_usage=kv, pool_kv_usage=kv, pool_queue=queue)

    def parse_with_attributes(self, text: str) -> tuple[Metrics, dict[str, float]]:
        """As MetricsParser's: a peer cluster's aggregates publish no attributes."""
        return self.parse(text), {}


class Parser(Protocol):
    names: tuple[str, ...]  # the metric names it reads (the series filter asks for these)

    def parse_with_attributes(self, text: str) -> tuple[Metrics, dict[str, float]]: ...


VLLM_PARSER = MetricsParser(BUILTIN_ENGINES["vllm"])


def parse_vllm_metrics(text: str) -> Metrics:
    """vLLM's metrics (the built-in `vllm` engine mapping)."""
    return VLLM_PARSER.parse(text)


MIN_BASE_TICK = 0.05  # llm-d's floor for the data layer's base tick


def poll_intervals(refresh: float, requested: Sequence[float | None]) -> list[float]:
    """llm-d's data-layer clock: the base tick is `--refresh-metrics-interval`, lowered to the shortest
    interval a source asks for (not below 50 ms unless the flag is); each source then polls every
    round(interval / tick) ticks, at least one, and every tick when it asks for no interval."""
    tick = refresh
    for iv in requested:
        if iv and iv < tick:
            tick = iv
    tick = max(tick, min(refresh, MIN_BASE_TICK))
    return [max(1, math.floor(iv / tick + 0.5)) * tick if iv else tick for iv in requested]


def ssl_context(source: HttpSource) -> ssl.SSLContext | None:
    """The client TLS settings of an https source (llm-d's: verification off unless insecureSkipVerify
    is false, then against caCertPath or the system CAs; a client certificate for mTLS). Raises ConfigError."""
    if source.scheme != "https":
        return None
    where = f"{source.name} parameters"
    try:
        if source.insecure_skip_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=source.ca_cert_path)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot read the CA bundle: {e}", source=where, field="caCertPath") from None
    if source.client_cert_path:
        try:
            ctx.load_cert_chain(source.client_cert_path, source.client_key_path)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the client certificate and key: {e}", source=where, field="clientCertPath") from None
    return ctx


def source_url(source: HttpSource, ep: Endpoint) -> str:
    """Where `source` fetches for `ep`: the endpoints file's metricsPort/metricsPath (a peer cluster's
    metricsAddress) win over the source's (for the model server's own sources); `use_node_address`
    fetches from the endpoint's node, or from the endpoint's own IP when its node is not known (file
    discovery), as llm-d does."""
    spec = ep.spec
    host = spec.host
    if source.use_node_address and spec.node_address:
        host = spec.node_address
    if not source.endpoint_overrides:
        return f"{source.scheme}://{host}:{source.port or spec.port}{source.path}"
    port = spec.metrics_port or source.port or spec.port
    return f"{source.scheme}://{spec.metrics_host or host}:{port}{spec.metrics_path or source.path}"


async def _sleep(loop: asyncio.AbstractEventLoop, delay: float) -> None:
    """asyncio.sleep on a loop already at hand: asyncio.sleep looks it up, a getpid() each time on
    Python 3.11, and the pollers sleep thousands of times a second."""
    if delay <= 0:
        await asyncio.sleep(0)
        return
    woken = loop.create_future()
    timer = loop.call_later(delay, _wake, woken)
    try:
        await woken
    finally:
        timer.cancel()


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class EndpointPoller:
    """Fetches `source` from every endpoint in the datastore every `interval` seconds while `run()` runs.

    Subclasses say what a body means (`take`) and what a failure does (`failed`)."""

    what = "fetching"

    def __init__(
        self,
        datastore: Datastore,
        source: HttpSource,
        *,
        interval: float,
        timeout: float,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        max_rate: float | None = None,
    ) -> None:
        self.datastore = datastore
        self.source = source
        self.interval = interval
        # the most fetches a second over all endpoints (--max-scrape-rate); None: no cap. Past it each
        # endpoint's period stretches (see `period`), so the event loop never does nothing but poll.
        self.max_rate = max_rate
        self._capped = False  # the cap binds now (logged when that changes)
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        # Without a session factory (tests give one), the pollers' own keep-alive client
        # (extproc.datalayer.http_get): about a third of aiohttp's CPU per fetch.
        self._ssl_ctx = ssl_context(source) if session_factory is None else None  # a bad certificate path stops start-up here
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | HttpGetter | None = None
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._urls: dict[str, str] = {}  # address -> the URL last fetched (to close its connection when it leaves)
        # endpoints another process fetches for the datastore (a worker's share: extproc.server.scrape_shares)
        self._delegated: frozenset[str] = frozenset()
        # Registered once, here: run() may be restarted by the supervisor and must not stack up
        # listeners. Outside run() the listener does nothing.
        datastore.on_membership_change(lambda added, removed: self._sync())

    @property
    def polling(self) -> frozenset[str]:
        """Addresses with a live polling task."""
        return frozenset(self._pollers)

    def url(self, ep: Endpoint) -> str:
        return source_url(self.source, ep)

    def _new_session(self) -> aiohttp.ClientSession | HttpGetter:
        if self._session_factory is not None:
            return self._session_factory()
        return HttpGetter(self._ssl_ctx, max_bytes=self.source.max_bytes)

    async def run(self) -> None:
        session = self._new_session()
        self._session = session
        try:
            self._sync()
            await asyncio.Event().wait()  # until cancelled; pollers run on their own
        finally:
            self._session = None
            pollers = list(self._pollers.values())
            self._pollers.clear()
            for task in pollers:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)
            await session.close()

    def delegate(self, addresses: frozenset[str]) -> None:
        """Fetch from every endpoint but these from now on (others fetch them for the datastore)."""
        self._delegated = addresses
        self._sync()

    def _sync(self) -> None:
        """Make the polling tasks match the datastore's membership, less the delegated endpoints."""
        if self._session is None:
            return
        wanted = {ep.address for ep in self.datastore.candidates()}
        if self._delegated:
            wanted -= self._delegated
        for address in list(self._pollers):
            if address not in wanted:
                self._pollers.pop(address).cancel()
                self._forget_url(address)
        loop = asyncio.get_running_loop()
        for address in wanted - self._pollers.keys():
            task = loop.create_task(self._poll(address, self._session), name=f"{self.source.name} {address}")
            self._pollers[address] = task
            task.add_done_callback(lambda t, a=address: self._forget(a, t))

    def _forget_url(self, address: str) -> None:
        url = self._urls.pop(address, None)
        if url is not None and isinstance(self._session, HttpGetter):
            self._session.drop(url)

    def _forget(self, address: str, task: asyncio.Task[None]) -> None:
        if self._pollers.get(address) is task:
            del self._pollers[address]

    def period(self) -> float:
        """Seconds between two fetches from one endpoint: the interval, or with `max_rate` at least
        endpoints / max_rate (logged when the cap starts and stops binding)."""
        if self.max_rate is None:
            return self.interval
        stretched = len(self._pollers) / self.max_rate
        capped = stretched > self.interval
        if capped != self._capped:
            self._capped = capped
            if capped:
                log.warning("%s %d endpoints every %gs would be %.0f fetches/s, over --max-scrape-rate %g: each endpoint "
                            "every %.3gs instead", self.what, len(self._pollers), self.interval, len(self._pollers) / self.interval,
                            self.max_rate, stretched)  # fmt: skip
            else:
                log.info("%s: %d endpoints, every %gs again (under --max-scrape-rate)", self.what, len(self._pollers), self.interval)
        return stretched if capped else self.interval

    async def _poll(self, address: str, session: aiohttp.ClientSession | HttpGetter) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        first = True
        while (ep := self.datastore.get(address)) is not None:
            started = time.monotonic()
            error = await self.scrape_once(ep, session)
            if error is not None and not failing:
                log.warning("%s %s (%s) failed: %s", self.what, ep.name, EndpointPoller.url(self, ep), error)
            elif error is None and failing:
                log.info("%s %s works again", self.what, ep.name)
            failing = error is not None
            period = self.period()
            delay = period - (time.monotonic() - started)
            if first:  # spread endpoints that joined together over the period
                delay += random.uniform(0.0, period)
                first = False
            await _sleep(loop, delay)

    async def scrape_once(self, ep: Endpoint, session: aiohttp.ClientSession | HttpGetter) -> str | None:
        """Fetch from one endpoint and record the result. Returns the error, if any."""
        try:
            await self.fetch(ep, session)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = f"timed out after {self.timeout:g}s"
        except (ScrapeError, HttpGetError) as e:
            error = str(e)
        except Exception as e:  # connection refused/reset, bad HTTP, ...: all mean "no fresh data"
            error = f"{type(e).__name__}: {e}"
        else:
            return None
        self.failed(ep, error)
        return error

    async def fetch(self, ep: Endpoint, session: aiohttp.ClientSession | HttpGetter, url: str | None = None) -> None:
        """GET `url` (default `url(ep)`) and `take` the body; raises on any failure."""
        url = url or self.url(ep)
        if isinstance(session, HttpGetter):
            self._urls[ep.address] = url
            status, body = await session.get(url, self.timeout)
            if status != 200:
                raise HttpStatusError(status, EndpointPoller.url(self, ep))
        else:
            async with session.get(url, timeout=self._client_timeout) as resp:
                if resp.status != 200:
                    raise HttpStatusError(resp.status, EndpointPoller.url(self, ep))
                body = await self._read(resp)
        self.take(ep, body)

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.source.max_bytes
        if cap is None:
            return await resp.read()
        if resp.content_length is not None and resp.content_length > cap:
            raise ScrapeError(f"answer of {resp.content_length} bytes; at most {cap} are read")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > cap:
                raise ScrapeError(f"answer over {cap} bytes; at most {cap} are read")
            chunks.append(chunk)
        return b"".join(chunks)

    def take(self, ep: Endpoint, body: bytes) -> None:
        """Record a fetched body; raises ScrapeError when it is unusable."""
        raise NotImplementedError

    def failed(self, ep: Endpoint, error: str) -> None:
        """A fetch failed (the error is logged once per outage by the poll loop)."""


class MetricsScraper(EndpointPoller):
    """The `metrics-data-source` + `core-metrics-extractor` pair: each endpoint's metrics, parsed with
    its engine's mapping; or, with a PoolMetricsExtraction (`multicluster-metrics-extractor`), each peer
    cluster's pool aggregates. A failure marks the endpoint's metrics as failing (see Datastore)."""

    what = "scraping"

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        source: HttpSource = DEFAULT_METRICS_SOURCE,
        extraction: MetricsExtraction | PoolMetricsExtraction = DEFAULT_EXTRACTION,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        max_rate: float | None = None,
    ) -> None:
        super().__init__(datastore, source, interval=interval, timeout=timeout, session_factory=session_factory, max_rate=max_rate)
        self.extraction = extraction
        self._pool = PoolMetricsParser(extraction) if isinstance(extraction, PoolMetricsExtraction) else None
        engines = extraction.engines if isinstance(extraction, MetricsExtraction) else {}
        self._parsers = {name: MetricsParser(engine) for name, engine in engines.items()}
        # With the source's series filter: per engine, the query that asks a Prometheus client library for
        # only the series its parser reads (`url`; prometheus_client honours `name[]`, and a server that
        # does not sends the whole page, which parses the same). An endpoint that answers the filtered
        # GET with a 3xx or 4xx, or with a page that lacks the gauges, and whose whole page at the source's
        # own URL reads, is asked for the whole page from then on, until it leaves the pool (`_whole_page`).
        parsers: list[Parser] = [*self._parsers.values(), *([self._pool] if self._pool is not None else [])]
        self._queries: dict[Parser, str] = (
            {parser: urlencode([("name[]", n) for n in parser.names]) for parser in parsers} if source.series_filter else {}
        )
        self._whole_page: set[str] = set()
        # per endpoint: the last body's length and xxh3 hash, the parser that read it, and what it read
        # (see `take`; a digest, not the body: 1,000 endpoints' bodies would be tens of MB)
        self._last: dict[str, tuple[int, int, Parser, Metrics, dict[str, float]]] = {}

    def parser_for(self, ep: Endpoint) -> Parser:
        if self._pool is not None:
            return self._pool
        assert isinstance(self.extraction, MetricsExtraction)
        return self._parsers[self.extraction.engine_for(ep.labels).name]

    def url(self, ep: Endpoint) -> str:
        """The source's URL; with the series filter, its path with a trailing slash and the filter's query
        (vLLM answers its exact `/metrics` with a handler that ignores `name[]`, and `/metrics/` with
        prometheus_client's, which honours it)."""
        url = super().url(ep)
        if not self._queries or ep.address in self._whole_page:
            return url
        filter_query = self._queries[self.parser_for(ep)]
        path, _, query = url.partition("?")
        return f"{path if path.endswith('/') else path + '/'}?{query + '&' if query else ''}{filter_query}"

    async def fetch(self, ep: Endpoint, session: aiohttp.ClientSession | HttpGetter) -> None:
        if not self._queries or ep.address in self._whole_page:
            return await super().fetch(ep, session)
        try:
            await super().fetch(ep, session)
        except (HttpStatusError, MetricsParseError) as e:
            if isinstance(e, HttpStatusError) and not 300 <= e.status < 500:
                raise  # the server's trouble (5xx), not the filter's
            # the whole page; when it fails too, the filter was not to blame (a server starting, say): the
            # error is that one, and the next scrape asks with the filter again
            await super().fetch(ep, session, EndpointPoller.url(self, ep))
            log.info("%s: the series filter got %s; fetching its whole /metrics page from now on", ep.name, e)
            self._whole_page.add(ep.address)

    def take(self, ep: Endpoint, body: bytes) -> None:
        parser = self.parser_for(ep)
        now = time.monotonic()
        last = self._last.get(ep.address)
        digest = xxhash.xxh3_64_intdigest(body)
        if last is not None and last[0] == len(body) and last[1] == digest and last[2] is parser:
            # the same bytes as the last scrape (an idle server): the same values, read again now, in a
            # new object (picks may hold the one the datastore had; a handed-out object is never changed)
            metrics, custom = copy.copy(last[3]), last[4]
        else:
            metrics, custom = parser.parse_with_attributes(body.decode("utf-8", errors="replace"))
            self._last[ep.address] = (len(body), digest, parser, metrics, custom)  # stamped below, before it is handed out
        metrics.updated_at = now
        self.datastore.update_metrics(ep.address, metrics)
        if custom:  # a custom metric not found keeps its last value (llm-d logs the error and goes on)
            self.datastore.update_attributes(ep.address, CORE_METRICS_PRODUCER, custom, now)

    def _forget_url(self, address: str) -> None:
        super()._forget_url(address)
        self._last.pop(address, None)
        self._whole_page.discard(address)

    def failed(self, ep: Endpoint, error: str) -> None:
        self.datastore.record_scrape_error(ep.address, error)
