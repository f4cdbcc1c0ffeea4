"""One worker process of `epp serve --workers N` (docs/scaling.md): the ext_proc gRPC server on the
shared port (SO_REUSEPORT), the same servicer and RequestStream as one process runs, and a
`RemoteDirector` that asks the parent for every pick over its unix socket (extproc.server.ipc) and
tells it each response's first byte and end. No scheduling state lives here; the metrics scraper of
the endpoints the parent assigns this worker runs here too (extproc.server.scrape_shares), and sends
what it reads to the parent.

Started by extproc.server.workers.WorkerPool as `python -m extproc.server.worker`, its options on stdin.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.handlers.parsers import RequestParsers
from extproc.handlers.request_stream import Outcome, RequestLimits, RequestStream, Routing
from extproc.handlers.usage import Usage
from extproc.server import ipc
from extproc.server.memory import HeapTrimmer
from extproc.server.scrape_shares import ScrapeShare
from extproc.server.workers import WorkerOptions
from pickers.config.parsers import ParserSpec
from pickers.framework.errors import SHUTTING_DOWN, RequestError
from pickers.framework.request import InferenceRequest

log = logging.getLogger(__name__)


class ParentLost(Exception):
    pass


class RemoteDirector:
    """The Director a worker's streams talk to: every pick is the parent's (`routes_later`), asked in
    `admit` and handed over by `route`; the rest is reported to the parent as it happens."""

    routes_later = True

    def __init__(self, link: ipc.FrameProtocol) -> None:
        self._link = link
        self._tickets = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # ticket -> its Picked/Refused or Metadata
        self._answers: dict[int, ipc.Picked] = {}  # id(request) -> the pick `route` hands over
        self.send_body = False  # the parent's plugins read request bodies (token-producers, precise indexes)
        self._evict: dict[int, Callable[[], None]] = {}  # ticket -> how to end that stream (flow control)
        # id(request) -> "asked" while the parent has its pick to make, "refused" once the parent refused
        # it (and recorded the refusal itself); gone when the request is routed, refused or abandoned
        self._asked: dict[int, str] = {}
        self.lost = False
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: each lookup is a getpid() on Python 3.11

    def _future(self) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    # -- what the parent sends ----------------------------------------------------------------
    def on_message(self, msg: Any) -> None:
        if type(msg) is ipc.Evict:
            evict = self._evict.get(msg.id)
            if evict is not None:
                evict()
            return
        fut = self._waiting.pop(msg.id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def parent_lost(self) -> None:
        self.lost = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ParentLost())
        self._waiting.clear()

    def _send(self, msg: msgspec.Struct) -> None:
        if not self.lost:
            self._link.send(msg)

    # -- the Director protocol (extproc.handlers.request_stream.Director) ---------------------------
    def needs_data(self, request: InferenceRequest) -> bool:
        return True

    async def prepare(self, request: InferenceRequest, subset: list[str] | None = None) -> None:
        return None  # the parent prepares, in `admit`'s pick

    async def admit(self, stream: RequestStream, evict: Callable[[], None] | None = None) -> list[Any]:
        """The parent's pick for the stream's request (its data, its flow control, its scheduler), then the
        stream's answer: `resume` (routed, `route` hands the pick over) or `refuse`."""
        request = stream.request
        assert request is not None
        if self.lost:
            return stream.refuse(_restarting())
        ticket = next(self._tickets)
        fut = self._future()
        self._waiting[ticket] = fut
        raw = stream.pending_body if self.send_body else None
        self._asked[id(request)] = "asked"
        self._send(ipc.pick_of(ticket, request, raw, stream.subset, stream.request_body_bytes))
        try:
            answer = await fut
        except ParentLost:
            return stream.refuse(_restarting())
        except asyncio.CancelledError:
            self._waiting.pop(ticket, None)
            # the client left while the parent worked on it: let go of what the parent holds for it
            self._send(ipc.Finish(ticket, None, False, None, True, None, 0.0, None, 0))
            raise
        if type(answer) is ipc.Refused:
            self._asked[id(request)] = "refused"
            return stream.refuse(ipc.error_of(answer.code, answer.status, answer.dropped_reason, answer.message))
        self._answers[id(request)] = answer
        if evict is not None:
            self._evict[ticket] = evict
        return stream.resume()

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing:
        answer = self._answers.pop(id(request))
        self._asked.pop(id(request), None)
        request.request_id = answer.request_id
        request.target_model = answer.target_model
        request.objective = answer.objective
        request.priority = answer.priority
        return Routing(
            request, answer.destination, None, 0, answer.scores, answer.request_headers, answer.response_headers,  # type: ignore[arg-type]
            answer.profile, ticket=answer.id, reports=answer.reports, capture=answer.capture,
        )  # fmt: skip

    def first_byte(self, routing: Routing, end_of_stream: bool = False) -> None:
        self._send(ipc.FirstByte(routing.ticket, end_of_stream))

    def finish(self, routing: Routing, outcome: Outcome) -> None:
        self._evict.pop(routing.ticket, None)
        usage = outcome.usage if isinstance(outcome.usage, Usage) else None
        self._send(ipc.Finish(
            routing.ticket, outcome.status, outcome.streaming, usage, outcome.aborted, outcome.served, outcome.duration,
            outcome.first_byte, outcome.body_chunks, ipc.error_fields(outcome.error) if outcome.error is not None else None,
            outcome.response,
        ))  # fmt: skip

    def rejected(self, request: InferenceRequest | None, error: RequestError, routed: bool = False) -> None:
        if request is not None:
            self._answers.pop(id(request), None)
            if self._asked.pop(id(request), None) == "refused":
                return  # the parent's refusal of its pick: recorded there, with the whole request
        k = error.kind
        self._send(ipc.Rejected(
            request.request_id if request else "", request.model if request else "", request.target_model if request else "",
            k.code, k.status, k.dropped_reason, error.message, routed, error.rule,
        ))  # fmt: skip

    def abandoned(self, request: InferenceRequest) -> None:
        if self._asked.pop(id(request), None) is not None:
            return  # the parent holds its pick: the cancelled pick's Finish tells it, and it records the request
        self._send(ipc.Abandoned(request.request_id, request.model, request.target_model))

    def response_metadata(self, routing: Routing, usage: object | None) -> Any:
        if not routing.reports:
            return None
        return self._metadata(routing.ticket, usage if isinstance(usage, Usage) else None)

    async def _metadata(self, ticket: int, usage: Usage | None) -> Mapping[str, Mapping[str, float]] | None:
        if self.lost:
            return None
        fut = self._future()
        self._waiting[ticket] = fut
        self._send(ipc.Report(ticket, usage))
        try:
            answer = await fut
        except ParentLost:
            return None
        return answer.metadata  # type: ignore[no-any-return]


def _restarting() -> RequestError:
    return RequestError(SHUTTING_DOWN, "the EPP is restarting: try again")


def _parsers(specs: list[tuple[str, str]]) -> RequestParsers:
    return RequestParsers([ParserSpec(name, kind) for name, kind in specs])


async def serve(opts: WorkerOptions) -> None:
    from extproc.server.runner import _GRPC_OPTIONS, ExtProcServicer

    loop = asyncio.get_running_loop()
    parent_gone = asyncio.Event()
    servicer: ExtProcServicer | None = None
    director: RemoteDirector | None = None

    def on_frame(frame: bytes) -> None:
        msg = ipc.worker_decoder.decode(frame)
        assert servicer is not None and director is not None
        kind = type(msg)
        if kind is ipc.Setup:
            servicer.parsers = _parsers(msg.specs)
            director.send_body = msg.send_body
        elif kind is ipc.Scrapes:
            share.assign(msg)
        else:
            director.on_message(msg)

    def on_lost() -> None:
        if director is not None:
            director.parent_lost()
        share.stop()
        parent_gone.set()

    link = ipc.FrameProtocol(on_frame, on_lost)
    share = ScrapeShare(link.send)  # this worker's share of the metrics scraping, as the parent assigns it
    await loop.create_unix_connection(lambda: link, opts.socket)
    director = RemoteDirector(link)
    director.send_body = opts.send_body
    limits = RequestLimits(opts.max_body_bytes, opts.max_headers, opts.max_headers_bytes, opts.body_idle_timeout)
    servicer = ExtProcServicer(director, limits, HeapTrimmer(), _parsers(opts.parsers))  # type: ignore[arg-type]
    server = grpc.aio.server(options=[(k, 1 if k == "grpc.so_reuseport" else v) for k, v in _GRPC_OPTIONS])
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    address = f"{opts.bind_address}:{opts.grpc_port}"
    if opts.cert_pem:
        server.add_secure_port(address, grpc.ssl_server_credentials([(opts.key_pem, opts.cert_pem)]))
    else:
        server.add_insecure_port(address)
    await server.start()
    link.send_frame(ipc.encode_hello(opts.index, os.getpid()))  # listening: the parent counts this worker in
    gc.collect()
    gc.freeze()  # what start-up made lives as long as the process: out of the cyclic collector's way
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gone = asyncio.create_task(parent_gone.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if gone.done():
        log.error("worker %d: the parent went away; stopping", opts.index)
        await server.stop(0)
    else:
        log.info("worker %d: draining %d open streams", opts.index, servicer.active_streams)
        await server.stop(None)  # the parent's grace period bounds this: it kills what outlasts it
    gone.cancel()
    stopping.cancel()
    await share.close()
    link.close()


def main() -> int:
    from extproc.observability.logs import setup_logging

    opts = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=WorkerOptions)
    setup_logging(opts.verbosity, opts.log_format)
    try:
        import uvloop

        uvloop.run(serve(opts))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(serve(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
