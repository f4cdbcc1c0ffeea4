"""The sidecar's HTTP face (aiohttp) and Sidecar, the in-process start/stop handle.

Every request is proxied to the decoder; a completion carrying `x-prefiller-host-port` first has
its prompt prefilled on that server (the prefill leg) and then goes to the decoder with the
returned `kv_transfer_params` (the decode leg). Any failure of the prefill leg degrades to a local
prefill on the decoder: the client is never failed for it. A client that goes away cancels its
handler, which closes the upstream connection, so the model server aborts the request too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from pd_sidecar import legs
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

    def validate(self) -> None:
        if not self.decoder.startswith(("http://", "https://")):
            raise ValueError(f"decoder: expected an http:// or https:// URL, got {self.decoder!r}")
        if self.prefill_retries < 0:
            raise ValueError(f"prefill_retries: must be >= 0, got {self.prefill_retries}")
        if self.prefill_timeout_s <= 0:
            raise ValueError(f"prefill_timeout_s: must be > 0, got {self.prefill_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in 0..65535, got {self.port}")


class PrefillFailed(Exception):
    """The prefill leg produced no kv_transfer_params; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _error(status: int, message: str, error_type: str) -> web.Response:
    # vLLM's error body, so clients see one error shape whichever hop answered.
    body = {"object": "error", "message": message, "type": error_type, "param": None, "code": status}
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


class Sidecar:
    """One sidecar. `port = await start()`; `await stop()` always."""

    def __init__(self, config: SidecarConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = SidecarMetrics()
        self._kv_source_logged = False  # x-kv-cache-source-host-port is logged once, then only counted
        self._decoder = config.decoder.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._warned_encoders = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self._port}"

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/sidecar/metrics", self._own_metrics)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> int:
        # No total timeout: a decode stream lasts as long as it lasts. Bytes pass through as sent.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,
        )
        runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._session.close()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        return self._port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = legs.request_headers(request.headers.items())
        if legs.ENCODERS_HEADER in request.headers:
            self._skip_encode_leg(request.headers[legs.ENCODERS_HEADER])
        prefillers = request.headers.getall(legs.PREFILLER_HEADER, None)
        if legs.KV_CACHE_SOURCE_HEADER in request.headers:
            self._kv_source_ignored(request.headers[legs.KV_CACHE_SOURCE_HEADER])
        if not prefillers or request.method != "POST" or not legs.is_generation_path(request.path):
            self.metrics.requests.labels(path="proxy").inc()
            return await self._forward(request, body, headers)
        try:
            doc = legs.parse_body(body)
        except legs.BadRequestBody as e:
            return _error(400, str(e), "BadRequestError")
        try:
            kv = await self._prefill(request, doc, headers, ",".join(prefillers))
        except PrefillFailed as e:
            self.metrics.fallbacks.labels(reason=e.reason).inc()
            self.metrics.requests.labels(path="fallback").inc()
            log.warning("prefill leg failed (%s: %s); prefilling locally on the decoder", e.reason, e)
            return await self._forward(request, body, headers)
        self.metrics.requests.labels(path="disaggregated").inc()
        return await self._forward(request, legs.decode_body(doc, kv), headers)

    def _kv_source_ignored(self, value: str) -> None:
        self.metrics.kv_source_ignored.inc()
        if not self._kv_source_logged:
            self._kv_source_logged = True
            log.warning("request names a KV cache source in %s (%s): this sidecar pulls no KV blocks over P2P, "
                        "so the decoder computes the prompt itself (counted in pd_sidecar_kv_cache_source_ignored; "
                        "logged once)", legs.KV_CACHE_SOURCE_HEADER, value)

    def _skip_encode_leg(self, encoders: str) -> None:
        self.metrics.encoders_ignored.inc()
        if not self._warned_encoders:  # once: every multimodal request of an E/P/D config carries it
            self._warned_encoders = True
            log.warning(
                "%s names encoders (%s), but this sidecar runs no encode leg: the media is encoded where the "
                "request is prefilled; use llm-d's routing sidecar for E/P/D (counted in "
                "pd_sidecar_encode_leg_skipped_total; logged once)", legs.ENCODERS_HEADER, encoders,
            )

    async def _prefill(self, request: web.Request, doc: dict[str, Any], headers: list[tuple[str, str]],
                       header_value: str) -> dict[str, Any]:
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
                self.metrics.retries.inc()
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
            self.metrics.prefill_seconds.observe(time.perf_counter() - started)
            return kv
        raise failure

    async def _forward(self, request: web.Request, body: bytes, headers: list[tuple[str, str]]) -> web.StreamResponse:
        """Send to the decoder and relay its answer chunk by chunk, status and headers as they are."""
        url = self._decoder + request.path_qs
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
                return _error(502, f"decoder {self._decoder} reset the connection: {e}", "BadGatewayError")
            return response  # the client went away; leaving the block closed the upstream request
        except aiohttp.ClientError as e:
            if response is None:
                return _error(502, f"decoder {self._decoder} unreachable: {e}", "BadGatewayError")
            # Headers are out: cut the client's connection so a truncated body cannot look complete.
            log.warning("decoder %s failed mid-response: %r", self._decoder, e)
            if request.transport is not None:
                request.transport.close()
            return response

    # ---- metrics ----------------------------------------------------------------------------

    async def _own_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _metrics(self, request: web.Request) -> web.Response:
        """The sidecar's metrics followed by the decoder's, so a scraper of this port sees both.

        Fails (502) when the decoder cannot be scraped: an endpoint picker must not mistake a dead
        decoder for an idle one.
        """
        try:
            async with self.session.get(self._decoder + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                decoder = await r.read()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _error(502, f"decoder {self._decoder} metrics unreachable: {e!r}", "BadGatewayError")
        if status != 200:
            return _error(502, f"decoder {self._decoder} metrics answered {status}", "BadGatewayError")
        own = self.metrics.render()
        return web.Response(body=own + decoder, headers={"Content-Type": CONTENT_TYPE})
