"""HTTP face of the simulator (aiohttp) and SimServer, the in-process start/stop handle.

Handlers only translate: parse with openai_api (anthropic_api for /v1/messages), submit to the
engine, relay its token outputs as JSON or SSE. Whatever ends a handler (done, client gone, cancelled) aborts unfinished requests so
the engine frees their slots and blocks, as vLLM does on disconnect.

The control endpoints (/sim/stats, /sim/reset, /sim/fault) are served on the main port, or, with
config.control_port set, only on 127.0.0.1:control_port (the main port then answers 404 for them).
With config.dcgm set, a DCGM exporter stand-in serves GET /metrics on its own port (vllm_sim/dcgm.py).

A server serves one or more ranks (vllm_sim/rank.py). With several (a data-parallel group behind
one API port, vLLM's internal or hybrid load balancing) each request goes to the rank vLLM's
front end would pick, and /metrics, /sim/stats and KV events are per rank. A server that builds
its own ranks also runs their step loop; one handed ranks (vllm_sim/data_parallel.py, a rank per
port) leaves the loop to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from vllm_sim import anthropic_api, dcgm
from vllm_sim import openai_api as api
from vllm_sim.config import ConfigError, SimConfig
from vllm_sim.engine import Engine, EngineRequest, PdLeg, RequestTooLarge, TokenOutput
from vllm_sim.kv_events import KVEventPublisher
from vllm_sim.lockstep import LockstepGroup
from vllm_sim.metrics import CONTENT_TYPE, SimMetrics
from vllm_sim.rank import SimRank, build_ranks
from vllm_sim.tokens import FillerText

log = logging.getLogger(__name__)

SERVED_BY_HEADER = "x-served-by"
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_HISTORY = 1000
CONTROL_HOST = "127.0.0.1"  # the control port is loopback-only, whatever --host says
# vLLM's header for pinning a request to a data-parallel rank (its OpenAI server reads it).
DP_RANK_HEADER = "x-data-parallel-rank"
_RANK = web.RequestKey("vllm_sim.rank", SimRank)  # the rank that serves a request
_SSE_DONE = b"data: [DONE]\n\n"


# /sim/stats fields of a rank that are not added up over the ranks of an internal-LB server.
_NOT_SUMMED = frozenset({"name", "kv_cache_usage_perc", "data_parallel_rank"})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


def _sse(body: Any) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


class SimServer:
    """One simulated vLLM endpoint. `port = await start()`; `await stop()` always."""

    def __init__(self, config: SimConfig, ranks: list[SimRank] | None = None) -> None:
        """ranks: serve these, stepped by the caller's LockstepGroup; None = build config's ranks
        and step them here (refused for external LB, where each rank has its own server)."""
        self.config = config
        self._group: LockstepGroup | None = None
        if ranks is None:
            dp = config.data_parallel
            if dp.lb == "external" and dp.size > 1:
                raise ConfigError("data_parallel_lb: external LB serves each rank on its own port; "
                                  "use vllm_sim.data_parallel.DataParallelSim")
            ranks = build_ranks(config)
            self._group = LockstepGroup([r.engine for r in ranks], config.time_scale, config.dp_all2all_s)
        self.ranks = tuple(ranks)
        self.request_ids: deque[str] = deque(maxlen=REQUEST_ID_HISTORY)
        self._name = config.name or ""
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._control_port = 0
        self._control_runner: web.AppRunner | None = None
        self._dcgm_port = 0
        self._dcgm_runner: web.AppRunner | None = None
        self._created = int(time.time())
        self.fault = "none"  # injected by POST /sim/fault: see _inject_fault
        self.render_calls = 0  # /v1/completions/render and /v1/chat/completions/render answered

    @property
    def engine(self) -> Engine:
        """The first rank's engine (the only one without data parallelism)."""
        return self.ranks[0].engine

    @property
    def metrics(self) -> SimMetrics:
        return self.ranks[0].metrics

    @property
    def group(self) -> LockstepGroup | None:
        """The step loop this server runs; None when its ranks are stepped by their owner."""
        return self._group

    @property
    def port(self) -> int:
        return self._port

    @property
    def name(self) -> str:
        """The x-served-by value: --name, else host:port as bound."""
        return self._name

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self._port}"

    @property
    def control_port(self) -> int:
        """Where /sim/* is served: the control port as bound, else the main port."""
        return self._control_port if self.config.control_port is not None else self._port

    @property
    def control_url(self) -> str:
        """Base URL of /sim/*: http://127.0.0.1:<control port> if one is set, else url."""
        return f"http://{CONTROL_HOST}:{self._control_port}" if self.config.control_port is not None else self.url

    @property
    def dcgm_port(self) -> int:
        """Where the DCGM stand-in listens, once started; 0 when it is off."""
        return self._dcgm_port

    @property
    def registry(self) -> CollectorRegistry:
        """The first rank's own Prometheus registry (several simulators can share a process)."""
        return self.metrics.registry

    @property
    def kv_events(self) -> KVEventPublisher | None:
        """The first rank's KV-event publisher, once started."""
        return self.ranks[0].kv_events

    def build_app(self) -> web.Application:
        """The main port's app; it carries /sim/* only when no separate control port is set."""
        app = web.Application(middlewares=[self._inject_fault, self._errors], client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/completions/render", self._render_completions)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/metrics/", self._metrics)
        if self.config.control_port is None:
            self._add_control_routes(app)
        return app

    def build_control_app(self) -> web.Application:
        """The control port's app: /sim/* only, never subject to injected faults."""
        app = web.Application(middlewares=[self._errors])
        app.on_response_prepare.append(self._stamp)
        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: web.Application) -> None:
        app.router.add_get("/sim/stats", self._stats)
        app.router.add_post("/sim/reset", self._reset)
        app.router.add_post("/sim/fault", self._set_fault)

    async def start(self) -> int:
        if self._group is not None:
            await self._group.start()
        # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
        runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            if self._group is not None:
                await self._group.stop()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        if self.config.control_port is not None:
            try:
                await self._start_control()
            except BaseException:
                await self.stop()
                raise
        if self.config.dcgm is not None:
            try:
                await self._start_dcgm(self.config.dcgm)
            except BaseException:
                await self.stop()
                raise
        if not self._name:
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            self._name = f"{host}:{self._port}"
        for rank in self.ranks:
            rank.name = self._name if len(self.ranks) == 1 else f"{self._name}/dp{rank.rank}"
        for rank in self.ranks:
            if rank.kv_events_config is None:
                continue
            # vLLM stamps each batch with the engine's DP rank; without DP the simulator leaves it out.
            dp_rank = rank.rank if self.config.data_parallel.enabled else None
            publisher = KVEventPublisher(rank.kv_events_config, dp_rank)
            rank.kv_events = publisher  # set first so stop() closes it if binding fails
            try:
                publisher.bind()
            except BaseException:
                await self.stop()
                raise
            publisher.set_topic(rank.kv_events_config.topic
                                or f"kv@{self.config.host}:{self._port}@{self.config.served_model}")
            rank.engine.cache.subscribe(publisher.on_event)
        return self._port

    async def _start_control(self) -> None:
        assert self.config.control_port is not None
        runner = web.AppRunner(self.build_control_app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        self._control_runner = runner  # set first so stop() cleans it up if binding fails
        await web.TCPSite(runner, CONTROL_HOST, self.config.control_port).start()
        self._control_port = runner.addresses[0][1]

    async def _start_dcgm(self, config: dcgm.DcgmConfig) -> None:
        loop = asyncio.get_running_loop()
        hostname = self.config.name or self.config.host

        async def gpu_metrics(request: web.Request) -> web.Response:
            now = loop.time()
            body = dcgm.render(config, [r.engine.busy.utilization(now) for r in self.ranks], hostname)
            return web.Response(body=body, content_type="text/plain", charset="utf-8")

        app = web.Application()
        app.router.add_get("/metrics", gpu_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._dcgm_runner = runner  # set first so stop() cleans it up if binding fails
        await web.TCPSite(runner, self.config.host, config.port).start()
        self._dcgm_port = runner.addresses[0][1]

    async def stop(self) -> None:
        # Engines first: that unblocks handlers still waiting on tokens so cleanup is quick.
        if self._group is not None:
            await self._group.stop()
        for attr in ("_runner", "_control_runner", "_dcgm_runner"):
            runner = getattr(self, attr)
            setattr(self, attr, None)
            if runner is not None:
                await runner.cleanup()
        for rank in self.ranks:
            if rank.kv_events is not None:
                rank.kv_events.close()
                rank.kv_events = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- plumbing ------------------------------------------------------------------------

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        rank = request.get(_RANK)
        response.headers[SERVED_BY_HEADER] = rank.name if rank is not None else self._name

    def _pick_rank(self, request: web.Request) -> SimRank:
        """The rank a request runs on: the x-data-parallel-rank header's (a global rank), else
        vLLM's internal load balancing: DPLBAsyncMPClient.get_core_engine_for_request
        (vllm/v1/engine/core_client.py) takes the engine with the lowest `waiting * 4 + running`,
        the first in rank order on a tie. vLLM scores counts its DP coordinator publishes every
        100 ms (bumping its own copy per pick); the simulator reads the live counts."""
        if len(self.ranks) == 1:
            rank = self.ranks[0]
        elif (pinned := request.headers.get(DP_RANK_HEADER)) is not None:
            rank = next((r for r in self.ranks if str(r.rank) == pinned.strip()), None)  # type: ignore[assignment]
            if rank is None:
                raise api.BadRequest(f"{DP_RANK_HEADER}: {pinned!r} is not a rank of this server "
                                     f"({', '.join(str(r.rank) for r in self.ranks)})")
        else:
            rank = min(self.ranks, key=lambda r: r.engine.num_waiting * 4 + r.engine.num_running)
        request[_RANK] = rank
        return rank

    FAULTS = ("none", "error", "hang", "garbage-metrics")

    @web.middleware
    async def _inject_fault(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Faults for reliability tests; /sim/* always works so a test can heal the server.
        error: every request (metrics too) gets 503. hang: requests are accepted and never answered.
        garbage-metrics: /metrics (and /metrics/) serves text without vLLM's gauges, the API keeps working."""
        fault = self.fault
        if fault == "none" or request.path.startswith("/sim/"):
            return await handler(request)
        if fault == "error":
            return _json(api.ApiError("injected fault").body(), status=503)
        if fault == "hang":
            await asyncio.Event().wait()  # until the client goes away (handler cancellation)
        if fault == "garbage-metrics" and request.path in ("/metrics", "/metrics/"):
            return web.Response(text="\x00\x01 not prometheus {{{\nvllm:num_requests_waiting{ oops\n")
        return await handler(request)

    async def _set_fault(self, request: web.Request) -> web.Response:
        fault = (await request.json()).get("mode", "none")
        if fault not in self.FAULTS:
            return _json({"error": f"mode must be one of {', '.join(self.FAULTS)}"}, status=400)
        self.fault = fault
        return _json({"status": "ok", "mode": fault})

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except api.ApiError as e:
            return _json(e.body(), status=e.status)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _json(api.ApiError("internal error in simulator").body(), status=500)

    # ---- OpenAI API ----------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is not None:
            self.request_ids.append(request_id)
        body = await request.read()
        parsed = api.parse_chat(body, self.config) if chat else api.parse_completion(body, self.config)
        head = api.ResponseHeader.new(parsed)
        reqs, outputs = self._engine_requests(parsed, head)
        rank = self._pick_rank(request)
        try:
            self._submit(rank.engine, reqs)
            if parsed.stream:
                return await self._stream(request, parsed, head, reqs, outputs)
            return await self._collect(rank, parsed, head, reqs, outputs)
        finally:
            self._abort_unfinished(rank.engine, reqs)

    def _engine_requests(self, parsed: api.ParsedRequest, head: api.ResponseHeader
                         ) -> tuple[list[EngineRequest], asyncio.Queue[TokenOutput]]:
        outputs: asyncio.Queue[TokenOutput] = asyncio.Queue()
        # n choices per prompt, each its own engine request; choice j of prompt p is index p*n + j, as in vLLM.
        n = parsed.n
        reqs = [
            EngineRequest(
                request_id=f"{head.id}-{p * n + j}",
                prompt_token_ids=list(prompt),
                max_tokens=parsed.max_tokens,
                filler=FillerText(self.config.seed, prompt, parsed.seed, choice=j),
                output=outputs,
                index=p * n + j,
                pd_leg=parsed.pd_leg,
            )
            for p, prompt in enumerate(parsed.prompts)
            for j in range(n)
        ]
        return reqs, outputs

    @staticmethod
    def _submit(engine: Engine, reqs: list[EngineRequest]) -> None:
        for r in reqs:
            try:
                engine.submit(r)
            except RequestTooLarge as e:
                raise api.BadRequest(str(e)) from None

    @staticmethod
    def _abort_unfinished(engine: Engine, reqs: list[EngineRequest]) -> None:
        for r in reqs:
            if not r.done:
                engine.abort(r)

    async def _collect(self, rank: SimRank, parsed: api.ParsedRequest, head: api.ResponseHeader,
                       reqs: list[EngineRequest], outputs: asyncio.Queue[TokenOutput]) -> web.Response:
        texts: list[list[str]] = [[] for _ in reqs]
        pending = len(reqs)
        while pending:
            out = await outputs.get()
            if out.error is not None:
                raise api.Unavailable(str(out.error))
            texts[out.request.index].append(out.text)
            pending -= out.finished
        body = api.full_response(head, ["".join(t) for t in texts], self._usage(reqs, parsed.n))
        if parsed.pd_leg is PdLeg.PREFILL:
            # vLLM hands these over only in a non-streamed response; so does the simulator.
            body["kv_transfer_params"] = api.produced_kv_transfer_params(
                reqs[0].kv_block_ids, rank.name, self.config.host, self._port, reqs[0].request_id)
        return _json(body)

    async def _stream(self, request: web.Request, parsed: api.ParsedRequest, head: api.ResponseHeader,
                      reqs: list[EngineRequest], outputs: asyncio.Queue[TokenOutput]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        pending = len(reqs)
        try:
            while pending:
                out = await outputs.get()
                if out.error is not None:
                    return response  # engine stopped: end the stream without [DONE], as a crash would
                index = out.request.index
                if parsed.chat and out.request.num_generated == 1:
                    await response.write(_sse(api.chunk(head, index, "", False, role=True)))
                await response.write(_sse(api.chunk(head, index, out.text, out.finished)))
                pending -= out.finished
            if parsed.include_usage:
                await response.write(_sse(api.usage_chunk(head, self._usage(reqs, parsed.n))))
            await response.write(_SSE_DONE)
            await response.write_eof()
        except ConnectionError:
            pass  # client went away mid-stream; the caller aborts what is left
        return response

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API: one prompt, one choice; errors in Anthropic's shape."""
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is not None:
            self.request_ids.append(request_id)
        try:
            parsed = anthropic_api.parse_messages(await request.read(), self.config)
            head = anthropic_api.new_header(parsed)
            reqs, outputs = self._engine_requests(parsed, head)
            rank = self._pick_rank(request)
            try:
                self._submit(rank.engine, reqs)
                if parsed.stream:
                    return await self._stream_messages(request, head, reqs[0], outputs)
                text: list[str] = []
                while True:
                    out = await outputs.get()
                    if out.error is not None:
                        raise api.Unavailable(str(out.error))
                    text.append(out.text)
                    if out.finished:
                        break
            finally:
                self._abort_unfinished(rank.engine, reqs)
        except api.ApiError as e:
            return _json(anthropic_api.error_body(e), status=e.status)
        r = reqs[0]
        usage = anthropic_api.usage(len(r.prompt_token_ids), r.num_generated, r.num_cached_tokens)
        return _json(anthropic_api.message(head, "".join(text), usage))

    async def _stream_messages(self, request: web.Request, head: api.ResponseHeader, req: EngineRequest,
                               outputs: asyncio.Queue[TokenOutput]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        started = False
        try:
            while True:
                out = await outputs.get()
                if out.error is not None:
                    return response  # engine stopped: end the stream without message_stop, as a crash would
                if not started:  # the prompt is computed: its cached part is known now
                    started = True
                    await response.write(anthropic_api.stream_start(head, len(req.prompt_token_ids), req.num_cached_tokens))
                await response.write(anthropic_api.stream_delta(out.text))
                if out.finished:
                    break
            await response.write(anthropic_api.stream_end(req.num_generated))
            await response.write_eof()
        except ConnectionError:
            pass  # client went away mid-stream; the caller aborts what is left
        return response

    @staticmethod
    def _usage(reqs: list[EngineRequest], n: int = 1) -> dict[str, Any]:
        # Like vLLM, a prompt's tokens count once however many choices it has (the first choice's).
        firsts = reqs[::n]
        return api.usage(
            prompt_tokens=sum(len(r.prompt_token_ids) for r in firsts),
            completion_tokens=sum(r.num_generated for r in reqs),
            cached_tokens=sum(r.num_cached_tokens for r in firsts),
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Each input is a prefill-only engine request (max_tokens=0): queued, prefix-cached and
        counted like a prompt, finishing after its prefill step, as vLLM runs a pooling request."""
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is not None:
            self.request_ids.append(request_id)
        parsed = api.parse_embedding(await request.read(), self.config)
        base_id = f"embd-{uuid.uuid4().hex}"
        outputs: asyncio.Queue[TokenOutput] = asyncio.Queue()
        reqs = [
            EngineRequest(
                request_id=f"{base_id}-{i}",
                prompt_token_ids=list(prompt),
                max_tokens=0,
                filler=FillerText(self.config.seed, prompt),
                output=outputs,
                index=i,
            )
            for i, prompt in enumerate(parsed.prompts)
        ]
        rank = self._pick_rank(request)
        try:
            self._submit(rank.engine, reqs)
            pending = len(reqs)
            while pending:
                out = await outputs.get()
                if out.error is not None:
                    raise api.Unavailable(str(out.error))
                pending -= out.finished
        finally:
            self._abort_unfinished(rank.engine, reqs)
        return _json(api.embedding_response(parsed, self.config, base_id, int(time.time())))

    async def _render_completions(self, request: web.Request) -> web.Response:
        """vLLM's /v1/completions/render: a list of GenerateRequest, one per prompt (no engine work)."""
        self.render_calls += 1
        parsed = api.parse_completion(await request.read(), self.config)
        return _json(api.render_response(parsed, f"cmpl-{uuid.uuid4().hex}"))

    async def _render_chat(self, request: web.Request) -> web.Response:
        """vLLM's /v1/chat/completions/render: one GenerateRequest (the chat template applied)."""
        self.render_calls += 1
        parsed = api.parse_chat(await request.read(), self.config)
        return _json(api.render_response(parsed, f"chatcmpl-{uuid.uuid4().hex}")[0])

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: {count, max_model_len, tokens, token_strs}."""
        _, ids = api.parse_tokenize(await request.read(), self.config)
        return _json(api.tokenize_response(ids, self.config))

    async def _models(self, request: web.Request) -> web.Response:
        return _json(api.models_list(self.config, self._created))

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        # as vLLM: its exact /metrics (prometheus-fastapi-instrumentator's handler) ignores the query;
        # /metrics/ (prometheus_client's ASGI app) serves only the series named by `name[]`
        names = request.query.getall("name[]", ()) if request.path.endswith("/") else ()
        body = SimMetrics.render_merged([rank.metrics for rank in self.ranks], names)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # ---- simulator control -----------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        """One rank: its counters and load. Several (internal LB): their sums, and each under `ranks`."""
        per_rank = [self._rank_stats(rank) for rank in self.ranks]
        if len(per_rank) == 1:
            body = per_rank[0]
        else:
            body = {key: sum(r[key] for r in per_rank) for key in per_rank[0] if key not in _NOT_SUMMED}
            body["kv_cache_usage_perc"] = sum(r["kv_cache_usage_perc"] for r in per_rank) / len(per_rank)
            body["ranks"] = per_rank
        body["name"] = self._name
        body["request_ids"] = list(self.request_ids)
        return _json(body)

    def _rank_stats(self, rank: SimRank) -> dict[str, Any]:
        engine, s = rank.engine, rank.engine.stats
        stats: dict[str, Any] = {
            "name": rank.name,
            "requests_total": s.requests_total,
            "prompt_tokens_total": s.prompt_tokens_total,
            "cached_prompt_tokens_total": s.cached_prompt_tokens_total,
            "generation_tokens_total": s.generation_tokens_total,
            "prefill_legs_total": s.prefill_legs_total,
            "decode_legs_total": s.decode_legs_total,
            "kv_transfer_tokens_total": s.kv_transfer_tokens_total,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "kv_cache_usage_perc": engine.cache.usage,
            "cached_blocks": engine.cache.cached_blocks,
        }
        if self.config.data_parallel.enabled:
            stats["data_parallel_rank"] = rank.rank
        return stats

    async def _reset(self, request: web.Request) -> web.Response:
        """Clear the prefix cache and /sim/stats counters; Prometheus counters stay monotonic."""
        for rank in self.ranks:
            rank.engine.reset()
        self.request_ids.clear()
        return _json({"status": "ok"})
