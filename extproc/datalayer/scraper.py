"""Model-server metrics: scrape each endpoint's vLLM `/metrics` and write the datastore.

One polling task per endpoint (a slow or dead endpoint only delays itself), one shared keep-alive
HTTP session, a timeout per scrape. Picks never wait for a scrape; they judge staleness with
`Datastore.is_stale`. The parser looks only at the few vLLM series we use (vLLM's names: docs/operating.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Callable

import aiohttp

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint, Metrics

log = logging.getLogger(__name__)

# vLLM's series we read, without their `vllm:` prefix
WAITING = "num_requests_waiting"
RUNNING = "num_requests_running"
KV_USAGE = "kv_cache_usage_perc"
KV_USAGE_OLD = "gpu_cache_usage_perc"  # vLLM before the V1 engine
CACHE_CONFIG = "cache_config_info"
LORA_INFO = "lora_requests_info"
PREFIX_HITS = "prefix_cache_hits_total"
PREFIX_QUERIES = "prefix_cache_queries_total"
_WANTED = (WAITING, RUNNING, KV_USAGE, KV_USAGE_OLD, CACHE_CONFIG, LORA_INFO, PREFIX_HITS, PREFIX_QUERIES)


class ScrapeError(Exception):
    """A scrape that produced no fresh metrics (bad status, unusable body)."""


class MetricsParseError(ScrapeError, ValueError):
    """A metrics body that does not carry the gauges a pick needs."""


# One sample line of a wanted metric: name, optional {labels} (quoted values may hold escaped
# quotes, braces and commas), value, then anything (timestamp, OpenMetrics exemplar). Matched on
# "\n" + text so the engine's literal-prefix search skips everything else (~8x faster than ^/M).
_SAMPLE = re.compile(
    r"\n[ \t]*vllm:(" + "|".join(_WANTED) + r")[ \t]*(?:\{((?:[^\"}\n]|\"(?:[^\"\\\n]|\\.)*\")*)\})?[ \t]*[ \t]([^ \t\r\n]+)",
)
_LABEL = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*\"((?:[^\"\\\n]|\\.)*)\"[ \t]*,?")
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out: dict[str, str] = {}
    for m in _LABEL.finditer(text):
        value = m.group(2)
        if "\\" in value:
            value = _ESCAPE.sub(lambda e: _UNESCAPED.get(e.group(1), "\\" + e.group(1)), value)
        out[m.group(1)] = value
    return out


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


def parse_vllm_metrics(text: str) -> Metrics:
    """Read vLLM's Prometheus text into Metrics (updated_at left at 0).

    Several series of one metric (data-parallel `engine` ranks, several `model_name`s) are summed
    for counts and averaged for KV usage. NaN/Inf samples and unparsable lines are ignored.
    Raises MetricsParseError when waiting, running or KV usage is missing.
    """
    waiting = running = 0.0
    n_waiting = n_running = 0
    kv_sum = kv_old_sum = 0.0
    n_kv = n_kv_old = 0
    hits = queries = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    lora_labels: str | None = None
    lora_newest = -math.inf

    for m in _SAMPLE.finditer("\n" + text):
        name, label_text, raw_value = m.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        if name == WAITING or name == RUNNING:
            value = min(max(value, 0.0), 1e12)  # sums stay finite whatever the body says
        if name == WAITING:
            waiting += value
            n_waiting += 1
        elif name == RUNNING:
            running += value
            n_running += 1
        elif name == KV_USAGE:
            kv_sum += value
            n_kv += 1
        elif name == KV_USAGE_OLD:
            kv_old_sum += value
            n_kv_old += 1
        elif name == PREFIX_HITS:
            hits += value
        elif name == PREFIX_QUERIES:
            queries += value
        elif name == CACHE_CONFIG:
            labels = _labels(label_text)
            blocks = _int_label(labels, "num_gpu_blocks")
            if blocks is not None:  # one series per engine: the endpoint holds them all
                num_gpu_blocks = blocks + (num_gpu_blocks or 0)
            if block_size is None:
                block_size = _int_label(labels, "block_size")
        elif name == LORA_INFO:
            if value > lora_newest:  # the value is a timestamp: the newest series wins
                lora_newest = value
                lora_labels = label_text or ""

    missing = [
        n
        for n, count in ((WAITING, n_waiting), (RUNNING, n_running), (KV_USAGE, n_kv + n_kv_old))
        if count == 0
    ]
    if missing:
        raise MetricsParseError(f"no usable sample of {', '.join('vllm:' + n for n in missing)}")

    kv = kv_sum / n_kv if n_kv else kv_old_sum / n_kv_old
    metrics = Metrics(
        waiting=max(0, round(waiting)),
        running=max(0, round(running)),
        kv_usage=min(1.0, max(0.0, kv)),
        block_size=block_size or None,
        num_gpu_blocks=num_gpu_blocks,
        prefix_cache_hits=hits,
        prefix_cache_queries=queries,
    )
    if lora_labels is not None:
        labels = _labels(lora_labels)
        metrics.running_lora_adapters = _adapters(labels.get("running_lora_adapters"))
        metrics.waiting_lora_adapters = _adapters(labels.get("waiting_lora_adapters"))
        metrics.max_lora = _int_label(labels, "max_lora")
    return metrics


def default_session() -> aiohttp.ClientSession:
    # No connection cap (one poller per endpoint keeps one connection alive); plain text, since
    # compressing a few kB on the model server and inflating it here costs more than it saves.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
        headers={"Accept": "text/plain", "Accept-Encoding": "identity"},
    )


class MetricsScraper:
    """Polls every endpoint in the datastore every `interval` seconds while `run()` is running."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        session_factory: Callable[[], aiohttp.ClientSession] = default_session,
    ) -> None:
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._pollers: dict[str, asyncio.Task[None]] = {}
        # Registered once, here: run() may be restarted by the supervisor and must not stack up
        # listeners. Outside run() the listener does nothing.
        datastore.on_membership_change(lambda added, removed: self._sync())

    @property
    def polling(self) -> frozenset[str]:
        """Addresses with a live polling task."""
        return frozenset(self._pollers)

    async def run(self) -> None:
        session = self._session_factory()
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

    def _sync(self) -> None:
        """Make the polling tasks match the datastore's membership."""
        if self._session is None:
            return
        wanted = {ep.address for ep in self.datastore.candidates()}
        for address in list(self._pollers):
            if address not in wanted:
                self._pollers.pop(address).cancel()
        loop = asyncio.get_running_loop()
        for address in wanted - self._pollers.keys():
            task = loop.create_task(self._poll(address, self._session), name=f"scrape {address}")
            self._pollers[address] = task
            task.add_done_callback(lambda t, a=address: self._forget(a, t))

    def _forget(self, address: str, task: asyncio.Task[None]) -> None:
        if self._pollers.get(address) is task:
            del self._pollers[address]

    async def _poll(self, address: str, session: aiohttp.ClientSession) -> None:
        failing = False
        first = True
        while (ep := self.datastore.get(address)) is not None:
            started = time.monotonic()
            error = await self.scrape_once(ep, session)
            if error is not None and not failing:
                log.warning("scraping %s (%s) failed: %s", ep.name, ep.spec.metrics_url, error)
            elif error is None and failing:
                log.info("scraping %s works again", ep.name)
            failing = error is not None
            delay = self.interval - (time.monotonic() - started)
            if first:  # spread endpoints that joined together over the interval
                delay += random.uniform(0.0, self.interval)
                first = False
            await asyncio.sleep(max(0.0, delay))

    async def scrape_once(self, ep: Endpoint, session: aiohttp.ClientSession) -> str | None:
        """Scrape one endpoint and record the result in the datastore. Returns the error, if any."""
        url = ep.spec.metrics_url
        try:
            async with session.get(url, timeout=self._client_timeout) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status} from {url}")
                body = await resp.read()
            metrics = parse_vllm_metrics(body.decode("utf-8", errors="replace"))
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = f"timed out after {self.timeout:g}s"
        except ScrapeError as e:
            error = str(e)
        except Exception as e:  # connection refused/reset, bad HTTP, ...: all mean "no fresh data"
            error = f"{type(e).__name__}: {e}"
        else:
            metrics.updated_at = time.monotonic()
            self.datastore.update_metrics(ep.address, metrics)
            return None
        self.datastore.record_scrape_error(ep.address, error)
        return error
