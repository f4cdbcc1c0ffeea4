"""The parent's side of `epp serve --workers N` (docs/scaling.md): N worker processes serve ext_proc
on the one gRPC port (SO_REUSEPORT: the kernel spreads Envoy's connections over them) and do the
per-message work (gRPC, protobuf, body parsing, usage reading); this process keeps every piece of
scheduling state (datastore, discovery, prefix and KV indexes, in-flight counts, flow control,
latency model, metrics) and makes every pick with the one Director, so N workers route exactly as
one process does. The workers also scrape the model servers' metrics, each a share of the endpoints
(extproc.server.scrape_shares), and send what they read here.

`PickService` answers the workers over a unix socket (extproc.server.ipc): a `Pick` becomes the
parsed request's trip through `Director.prepare`, `admit` (flow control) and `route`; its `Finish`
settles the books. A worker that dies loses nothing here: the routings it held are finished as
aborted (their in-flight counts come off) and `WorkerPool` starts it again; its streams fail over
in Envoy as on any EPP restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from extproc.handlers.request_stream import Outcome, Routing
from extproc.requestcontrol.director import Director
from extproc.server import ipc
from extproc.server.child_process import die_with_parent
from pickers.framework.errors import PROTOCOL, RequestError

if TYPE_CHECKING:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.server.scrape_shares import ScrapeShares

log = logging.getLogger(__name__)


class WorkerOptions(msgspec.Struct):
    """What a worker process is started with (written to its stdin: TLS keys stay off the command line)."""

    socket: str
    index: int
    grpc_port: int
    bind_address: str
    max_body_bytes: int
    max_headers: int
    max_headers_bytes: int
    body_idle_timeout: float | None
    parsers: list[tuple[str, str]]  # the config's request parsers at the start (ipc.Setup: again on connect)
    send_body: bool
    verbosity: int = 0
    log_format: str = "text"
    cert_pem: bytes = b""  # with secure serving: every worker serves the one certificate
    key_pem: bytes = b""


@dataclass(slots=True)
class _Adapter:
    """What `Director.admit` drives in place of a RequestStream: `resume` makes the pick, `refuse` the refusal."""

    service: PickService
    conn: _Conn
    ticket: int
    request: Any
    subset: list[str] | None
    request_body_bytes: int
    routing: Routing | None = None

    def resume(self) -> ipc.Picked | ipc.Refused:
        try:
            self.routing = routing = self.service.director.route(self.request, self.subset)
        except RequestError as e:
            return self.refuse(e)
        self.conn.routings[self.ticket] = routing
        req = routing.request
        reports = bool((routing.scheduler or self.service.director.scheduler).reporters)
        return ipc.Picked(
            self.ticket, routing.destination, routing.scores, dict(routing.request_headers), dict(routing.response_headers),
            routing.profile, req.request_id, req.target_model, req.objective, req.priority, reports, routing.capture,
        )  # fmt: skip

    def refuse(self, err: RequestError) -> ipc.Refused:
        """The parent refused the pick: recorded here, where the whole request is (the worker only answers)."""
        self.service.director.rejected(self.request, err)
        return _refused(self.ticket, err)


def _refused(ticket: int, e: RequestError) -> ipc.Refused:
    return ipc.Refused(ticket, e.kind.code, e.kind.status, e.kind.dropped_reason, e.message)


@dataclass(slots=True, eq=False)
class _Conn:
    """One worker's connection: the routings its streams hold, by the worker's ticket."""

    proto: ipc.FrameProtocol | None = None
    index: int = -1  # -1 until its hello
    routings: dict[int, Routing] = field(default_factory=dict)
    pending: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # picks waiting for data or flow control
    waiting: dict[int, Any] = field(default_factory=dict)  # their requests, by ticket
    picks: int = 0  # requests this worker asked a pick for
    pid: int = 0

    def send(self, msg: msgspec.Struct) -> None:
        assert self.proto is not None
        self.proto.send(msg)


class PickService:
    """The workers' one Director, over a unix socket."""

    def __init__(self, director: Director, path: Path, setup: Callable[[], ipc.Setup], shares: ScrapeShares | None = None) -> None:
        self.director = director
        self.path = path
        self.shares = shares  # the metrics scraping shared out over the workers; None: this process scrapes
        self._setup = setup  # the config serving's parsers, and whether a plugin of it reads request.body
        self._server: asyncio.AbstractServer | None = None
        self.conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.proto is not None:
                conn.proto.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def config_changed(self) -> None:
        """A config reload: streams opened from now on in every worker use its parsers."""
        msg = self._setup()
        for conn in self.conns:
            conn.send(msg)

    def view(self) -> list[dict[str, int]]:
        """Per worker: its pid, the picks it asked for, the requests it holds now (/debug/runtime)."""
        shares = self.shares
        return sorted(({"worker": c.index, "pid": c.pid, "picks": c.picks, "in_flight": len(c.routings),
                        "scraping": shares.scraping(c) if shares is not None else 0} for c in self.conns),
                      key=lambda v: v["worker"])  # fmt: skip

    def _accept(self) -> ipc.FrameProtocol:
        conn = _Conn()
        conn.proto = ipc.FrameProtocol(lambda frame: self._frame(conn, frame), lambda: self._closed(conn))
        return conn.proto

    def _frame(self, conn: _Conn, frame: bytes) -> None:
        if conn.index < 0:  # the worker's hello: "index pid", sent once it listens
            index, _, pid = frame.decode().partition(" ")
            conn.index, conn.pid = int(index), int(pid or 0)
            self.conns.add(conn)
            conn.send(self._setup())
            if self.shares is not None:
                self.shares.joined(conn)
            return
        try:
            msg = ipc.parent_decoder.decode(frame)
        except msgspec.DecodeError as e:
            log.error("worker %d: bad IPC message (%s): closing its connection", conn.index, e)
            if conn.proto is not None:
                conn.proto.abort()
            return
        kind = type(msg)
        if kind is ipc.Pick:
            self._pick(conn, msg)
        elif kind is ipc.Finish:
            self._finish(conn, msg)
        elif kind is ipc.FirstByte:
            routing = conn.routings.get(msg.id)
            if routing is not None:
                self.director.first_byte(routing, msg.end_of_stream)
        elif kind is ipc.Scraped or kind is ipc.ScrapedAttributes or kind is ipc.ScrapeFailed:
            if self.shares is not None:
                self.shares.take(conn, msg)
        elif kind is ipc.Rejected:
            self._rejected(msg)
        elif kind is ipc.Abandoned:
            self.director.abandoned(_request_of(msg))
        elif kind is ipc.Report:
            routing = conn.routings.get(msg.id)
            md = self.director.response_metadata(routing, msg.usage) if routing is not None else None
            conn.send(ipc.Metadata(msg.id, md))

    def _closed(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if self.shares is not None and conn.index >= 0:
            self.shares.left(conn)  # its share goes to the others (or back to this process)
        self._lost(conn)

    def _lost(self, conn: _Conn) -> None:
        """The worker went away: what its streams held comes off the books, as an abort would."""
        if conn.routings:
            log.warning("worker %d: connection lost with %d requests in flight; they are settled as aborted", conn.index, len(conn.routings))
        routings, conn.routings = conn.routings, {}
        for task in list(conn.pending.values()):
            task.cancel()
        for routing in routings.values():
            self.director.finish(routing, Outcome(status=None, streaming=False, usage=None, aborted=True, served=None))

    def _pick(self, conn: _Conn, msg: ipc.Pick) -> None:
        conn.picks += 1
        req = ipc.request_of(msg, self._body(msg.body))
        adapter = _Adapter(self, conn, msg.id, req, msg.subset, msg.body_bytes)
        if not self.director.needs_data(req):
            conn.send(adapter.resume())
            return
        task = asyncio.create_task(self._pick_later(conn, adapter))
        conn.pending[msg.id] = task
        conn.waiting[msg.id] = req
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t, ticket=msg.id: (conn.pending.pop(ticket, None), conn.waiting.pop(ticket, None)))

    async def _pick_later(self, conn: _Conn, adapter: _Adapter) -> None:
        """The token-producers' data, flow control's queue, then the pick (as the one-process servicer)."""
        ticket = adapter.ticket
        try:
            await self.director.prepare(adapter.request, adapter.subset)
            answer: ipc.Picked | ipc.Refused = await self.director.admit(adapter, lambda: conn.send(ipc.Evict(ticket)))  # type: ignore[arg-type]
        except Exception as e:  # a bug must cost one request
            log.exception("request %s: internal error while it waited for its pick", adapter.request.request_id)
            answer = ipc.Refused(ticket, PROTOCOL.code, PROTOCOL.status, None, f"internal error: {e}")
        if conn.proto is None or conn.proto.closed:  # the worker went while the request waited: nothing to answer
            routing = conn.routings.pop(ticket, None)
            if routing is not None:
                self.director.finish(routing, Outcome(status=None, streaming=False, usage=None, aborted=True, served=None))
            return
        conn.send(answer)  # type: ignore[arg-type]

    def _body(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return {}  # the worker parsed it: not reached
        return body if isinstance(body, dict) else {}

    def _finish(self, conn: _Conn, msg: ipc.Finish) -> None:
        routing = conn.routings.pop(msg.id, None)
        if routing is None:  # the client left while its request waited (flow control's queue, a token-producer)
            task = conn.pending.pop(msg.id, None)
            if task is not None:
                task.cancel()
            request = conn.waiting.pop(msg.id, None)
            if request is not None:
                self.director.abandoned(request)
            return
        outcome = Outcome(
            status=msg.status, streaming=msg.streaming, usage=msg.usage, aborted=msg.aborted, served=msg.served,
            duration=msg.duration, first_byte=msg.first_byte, body_chunks=msg.body_chunks,
            error=ipc.error_of(*msg.error) if msg.error is not None else None, response=msg.response,
        )  # fmt: skip
        self.director.finish(routing, outcome)

    def _rejected(self, msg: ipc.Rejected) -> None:
        error = ipc.error_of(msg.code, msg.status, msg.dropped_reason, msg.message, msg.rule)
        self.director.rejected(_request_of(msg), error, routed=msg.routed)


def _request_of(msg: ipc.Rejected | ipc.Abandoned) -> Any:
    """What the parent knows of a request the worker refused or lost before asking for its pick."""
    from pickers.framework.request import InferenceRequest

    return InferenceRequest(msg.request_id, "", {}, model=msg.model, target_model=msg.target_model)


class WorkerPool:
    """Starts the N worker processes and starts each again when it dies (with backoff), until `stop`."""

    def __init__(self, n: int, options: Callable[[int], WorkerOptions]) -> None:
        self.n = n
        self._options = options
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = [0] * n
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i), name=f"epp-worker-{i}") for i in range(self.n)]

    async def _spawn(self, i: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc.server.worker", stdin=asyncio.subprocess.PIPE, preexec_fn=die_with_parent,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(msgspec.msgpack.encode(self._options(i)))
        proc.stdin.close()
        self.procs[i] = proc
        return proc

    async def _keep(self, i: int) -> None:
        delay = 0.1
        while not self._stopping:
            started = time.monotonic()
            proc = await self._spawn(i)
            code = await proc.wait()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again", i, proc.pid, _exit_status(code))
            self.restarts[i] += 1
            delay = 0.1 if time.monotonic() - started > 10 else min(delay * 2, 5.0)
            await asyncio.sleep(delay)

    async def stop(self, grace: float) -> None:
        """SIGTERM each worker (it drains its streams up to `grace` seconds), SIGKILL what remains."""
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in self.procs.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace + 5)
            for proc in self.procs.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _exit_status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


def socket_path(directory: str | None = None) -> Path:
    base = Path(directory or os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return base / f"llm-epp-{os.getpid()}.sock"
