"""The sidecar's HTTP face (aiohttp) and Sidecar, the in-process start/stop handle.

With `data_parallel_size` N it serves N ports, one per data-parallel rank, each in front of that
rank's decoder (ranks.py); `x-data-parallel-host-port` sends a request that arrived on one port to the
rank it names. Every request is proxied to its rank's decoder; a completion carrying
`x-prefiller-host-port` first has its prompt prefilled on that server (the prefill leg) and then goes
to the decoder with the returned `kv_transfer_params` (the decode leg). Any failure of the prefill leg degrades to a local
prefill on the decoder: the client is never failed for it. A client that goes away cancels its
handler, which closes the upstream connection, so the model server aborts the request too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pd_sidecar import legs, ranks
from pd_sidecar.metrics import SidecarMetrics

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RETRYABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    decoder: str  # base URL of the decode server, e.g. http://127.0.0.1:8200
    host: str = "127.0.0.1"
    port: int = 0  # 0 = let the OS pick a free port
    prefill_retries: int = 2  # extra attempts after a 502/503/504 or a connection error
    prefill_timeout_s: float = 60.0  # per attempt; a timed-out prefill is not retried
    retry_backoff_s: float = 0.05  # doubled after each retry
    connect_timeout_s: float = 5.0
    # Data parallel (llm-d's --data-parallel-size): rank r on port + r (or rank_ports[r]) in front of the
    # decoder's port + r (or decoder_rank_ports[r]); port 0 = each rank on a free port.
    data_parallel_size: int = 1
    rank_ports: tuple[int, ...] = ()
    decoder_rank_ports: tuple[int, ...] = ()
    # The address the EPP names this pod by in x-data-parallel-host-port (llm-d: $POD_IP); "" = `host`
    # unless that is a wildcard, in which case the header's port alone picks the rank.
    pod_ip: str = ""

    def validate(self) -> None:
        if not self.decoder.startswith(("http://", "https://")):
            raise ValueError(f"decoder: expected an http:// or https:// URL, got {self.decoder!r}")
        if self.prefill_retries < 0:
            raise ValueError(f"prefill_retries: must be >= 0, got {self.prefill_retries}")
        if self.prefill_timeout_s <= 0:
            raise ValueError(f"prefill_timeout_s: must be > 0, got {self.prefill_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")
        ranks.validate_layout(decoder=self.decoder, port=self.port, size=self.data_parallel_size,
                              rank_ports=self.rank_ports, decoder_rank_ports=self.decoder_rank_ports,
                              pod_ip=self.pod_ip)


class PrefillFailed(Exception):
    """The prefill leg produced no kv_transfer_params; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _error(status: int, message: str, error_type: str) -> web.Response:
    # vLLM's error body, so clients see one error shape whichever hop answered.
    body = {"object": "error", "message": message, "type": error_type, "param": None, "code": status}
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


@dataclass(slots=True)
class SidecarRank:
    """One data-parallel rank: its port (once bound), its decoder, and its own metrics registry, which
    its port's /metrics and /sidecar/metrics serve (so each rank endpoint scrapes as one server)."""

    index: int
    decoder: str  # base URL, no trailing slash
    metrics: SidecarMetrics
    port: int = 0


class Sidecar:
    """One sidecar (one port per data-parallel rank). `port = await start()`; `await stop()` always."""

    def __init__(self, config: SidecarConfig) -> None:
        config.validate()
        self.config = config
        self.ranks = tuple(
            SidecarRank(r, decoder, SidecarMetrics())
            for r, decoder in enumerate(ranks.decoder_urls(config.decoder, config.data_parallel_size,
                                                           config.decoder_rank_ports)))
        self._table = ranks.RankTable(ranks.pod_address(config.pod_ip, config.host), {})
        self._kv_source_logged = False  # x-kv-cache-source-host-port is logged once, then only counted
        self._warned_encoders = False
        self._dp_header_logged = False
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []

    @property
    def metrics(self) -> SidecarMetrics:
        """Rank 0's metrics (the only rank without data parallelism)."""
        return self.ranks[0].metrics

    @property
    def port(self) -> int:
        """Rank 0's port: the primary one, where x-data-parallel-host-port requests arrive."""
        return self.ranks[0].port

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(rank.port for rank in self.ranks)

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> tuple[str, ...]:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return tuple(f"http://{host}:{rank.port}" for rank in self.ranks)

    @property
    def rank_table(self) -> ranks.RankTable:
        return self._table

    def build_app(self, rank: SidecarRank) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/sidecar/metrics", partial(self._own_metrics, rank))
        app.router.add_get("/metrics", partial(self._metrics, rank))
        app.router.add_route("*", "/{tail:.*}", partial(self._handle, rank))
        return app

    async def start(self) -> int:
        # No total timeout: a decode stream lasts as long as it lasts. Bytes pass through as sent.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,
        )
        ports = ranks.listen_ports(self.config.port, self.config.data_parallel_size, self.config.rank_ports)
        try:
            for rank, port in zip(self.ranks, ports, strict=True):
                runner = web.AppRunner(self.build_app(rank), handler_cancellation=True, access_log=None,
                                       shutdown_timeout=1.0)
                await runner.setup()
                self._runners.append(runner)
                await web.TCPSite(runner, self.config.host, port).start()
                rank.port = runner.addresses[0][1]
        except BaseException:
            await self.stop()
            raise
        self._table = ranks.RankTable(self._table.address, {rank.port: rank.index for rank in self.ranks})
        return self.port

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("sidecar not started")
        return self._session

    # ---- proxying ---------------------------------------------------------------------------

    async def _handle(self, arrived: SidecarRank, request: web.Request) -> web.StreamResponse:
        rank = arrived
        dp_target = request.headers.getall(legs.DATA_PARALLEL_HEADER, None)
        if dp_target is not None:
            try:
                rank = self.ranks[self._table.rank_of(dp_target)]
            except legs.BadDataParallelHeader as e:
                arrived.metrics.dp_header.labels(outcome="bad_header").inc()
                return _error(400, str(e), "BadRequestError")
            except ranks.UnknownRank as e:
                arrived.metrics.dp_header.labels(outcome="unknown_rank").inc()
                return _error(400, str(e), "BadRequestError")
            arrived.metrics.dp_header.labels(outcome="routed").inc()
            self._log_dp_header_once()
        body = await request.read()
        headers = legs.request_headers(request.headers.items())
        if legs.ENCODERS_HEADER in request.headers:
            self._skip_encode_leg(rank, request.headers[legs.ENCODERS_HEADER])
        prefillers = request.headers.getall(legs.PREFILLER_HEADER, None)
        if legs.KV_CACHE_SOURCE_HEADER in request.headers:
            self._kv_source_ignored(rank, request.headers[legs.KV_CACHE_SOURCE_HEADER])
        if not prefillers or request.method != "POST" or not legs.is_generation_path(request.path):
            rank.metrics.requests.labels(path="proxy").inc()
            return await self._forward(rank, request, body, headers)
        try:
            doc = legs.parse_body(body)
        except legs.BadRequestBody as e:
            return _error(400, str(e), "BadRequestError")
        try:
            kv = await self._prefill(rank, request, doc, headers, ",".join(prefillers))
        except PrefillFailed as e:
            rank.metrics.fallbacks.labels(reason=e.reason).inc()
            rank.metrics.requests.labels(path="fallback").inc()
            log.warning("prefill leg failed (%s: %s); prefilling locally on the decoder", e.reason, e)
            return await self._forward(rank, request, body, headers)
        rank.metrics.requests.labels(path="disaggregated").inc()
        return await self._forward(rank, request, legs.decode_body(doc, kv), headers)

    def _log_dp_header_once(self) -> None:
        if not self._dp_header_logged:
            self._dp_header_logged = True
            log.info("routing requests to ranks by %s (llm-d deprecates the header: with Istio >= 1.28.1 the "
                     "gateway sends each request to its rank's port itself); counted in "
                     "pd_sidecar_data_parallel_header_total, logged once", legs.DATA_PARALLEL_HEADER)

    def _kv_source_ignored(self, rank: SidecarRank, value: str) -> None:
        rank.metrics.kv_source_ignored.inc()
        if not self._kv_source_logged:
            self._kv_source_logged = True
            log.warning("request names a KV cache source in %s (%s): this sidecar pulls no KV blocks over P2P, "
                        "so the decoder computes the prompt itself (counted in pd_sidecar_kv_cache_source_ignored; "
                        "logged once)", legs.KV_CACHE_SOURCE_HEADER, value)

    def _skip_encode_leg(self, rank: SidecarRank, encoders: str) -> None:
        rank.metrics.encoders_ignored.inc()
        if not self._warned_encoders:  # once: every multimodal request of an E/P/D config carries it
            self._warned_encoders = True
            log.warning(
                "%s names encoders (%s), but this sidecar runs no encode leg: the media is encoded where the "
                "request is prefilled; use llm-d's routing sidecar for E/P/D (counted in "
                "pd_sidecar_encode_leg_skipped_total; logged once)", legs.ENCODERS_HEADER, encoders,
            )

    async def _prefill(self, rank: SidecarRank, request: web.Request, doc: dict[str, Any],
                       headers: list[tuple[str, str]], header_value: str) -> dict[str, Any]:
        """Run the prefill leg, retrying 502/503/504 and connection errors; its kv_transfer_params."""
        try:
            hosts = legs.parse_prefillers(header_value)
        except legs.BadPrefillerHeader as e:
            raise PrefillFailed("bad_header", str(e)) from None
        body = legs.prefill_body(doc)
        leg_headers = legs.prefill_headers(headers)
        timeout = aiohttp.ClientTimeout(total=self.config.prefill_timeout_s,
                                        sock_connect=self.config.connect_timeout_s)
        started = time.perf_counter()
        failure = PrefillFailed("unreachable", "no attempt made")
        for attempt in range(self.config.prefill_retries + 1):
            if attempt:
                rank.metrics.retries.inc()
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            url = f"http://{hosts[attempt % len(hosts)]}{request.path_qs}"
            try:
                async with self.session.post(url, data=body, headers=leg_headers, timeout=timeout) as r:
                    data = await r.read()
                    status = r.status
            except asyncio.TimeoutError:
                raise PrefillFailed("timeout", f"{url} gave no answer in {self.config.prefill_timeout_s:g}s") from None
            except aiohttp.ClientError as e:
                failure = PrefillFailed("unreachable", f"{url}: {type(e).__name__}: {e}")
                continue
            if status in RETRYABLE_STATUSES:
                failure = PrefillFailed("error_status", f"{url} answered {status}")
                continue
            if status != 200:
                raise PrefillFailed("error_status", f"{url} answered {status}: {data[:200]!r}")
            kv = legs.returned_kv_transfer_params(data)
            if kv is None:
                raise PrefillFailed("no_kv_transfer_params", f"{url} answered without kv_transfer_params")
            rank.metrics.prefill_seconds.observe(time.perf_counter() - started)
            return kv
        raise failure

    async def _forward(self, rank: SidecarRank, request: web.Request, body: bytes,
                       headers: list[tuple[str, str]]) -> web.StreamResponse:
        """Send to the rank's decoder and relay its answer chunk by chunk, status and headers as they are."""
        decoder = rank.decoder
        url = decoder + request.path_qs
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, data=body or None, headers=headers) as up:
                response = web.StreamResponse(status=up.status, reason=up.reason,
                                              headers=legs.response_headers(up.headers.items()))
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as e:
            if response is None:
                return _error(502, f"decoder {decoder} reset the connection: {e}", "BadGatewayError")
            return response  # the client went away; leaving the block closed the upstream request
        except aiohttp.ClientError as e:
            if response is None:
                return _error(502, f"decoder {decoder} unreachable: {e}", "BadGatewayError")
            # Headers are out: cut the client's connection so a truncated body cannot look complete.
            log.warning("decoder %s failed mid-response: %r", decoder, e)
            if request.transport is not None:
                request.transport.close()
            return response

    # ---- metrics ----------------------------------------------------------------------------

    async def _own_metrics(self, rank: SidecarRank, request: web.Request) -> web.Response:
        return web.Response(body=rank.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _metrics(self, rank: SidecarRank, request: web.Request) -> web.Response:
        """This rank's sidecar metrics followed by its decoder's, so a scraper of this port sees both.

        Fails (502) when the decoder cannot be scraped: an endpoint picker must not mistake a dead
        decoder for an idle one.
        """
        decoder = rank.decoder
        try:
            async with self.session.get(decoder + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                decoder = await r.read()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _error(502, f"decoder {decoder} metrics unreachable: {e!r}", "BadGatewayError")
        if status != 200:
            return _error(502, f"decoder {decoder} metrics answered {status}", "BadGatewayError")
        own = rank.metrics.render()
        return web.Response(body=own + decoder, headers={"Content-Type": CONTENT_TYPE})
