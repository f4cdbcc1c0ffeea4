"""A minimal HTTP/1.1 message parser and closed-loop load generator for the overhead benchmark.

Far cheaper per request than aiohttp or httpx, so the load generator and the no-op backend leave
more of the 2 cores to Envoy and the EPP. Handles exactly what Envoy sends: Content-Length or
chunked bodies on keep-alive connections; no pipelining, no read-until-close bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


class ParseError(ValueError):
    """The bytes are not an HTTP/1.1 message this parser supports."""


@dataclass(frozen=True, slots=True)
class Message:
    start_line: bytes  # b"POST /v1/completions HTTP/1.1" or b"HTTP/1.1 200 OK"
    headers: dict[bytes, bytes]  # names lower-cased; a repeated header keeps its last value
    body: bytes

    @property
    def status(self) -> int:
        return int(self.start_line.split(b" ", 2)[1])


class Parser:
    """Feed bytes as they arrive; get back the messages they complete, in order."""

    __slots__ = ("_buf", "_head", "_headers", "_need", "_chunks")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: bytes | None = None
        self._headers: dict[bytes, bytes] = {}
        self._need = 0  # body bytes still expected; -1 = chunked
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if self._head is None and not self._read_head():
                return out
            body = self._read_chunked() if self._need < 0 else self._read_sized()
            if body is None:
                return out
            assert self._head is not None
            out.append(Message(self._head, self._headers, body))
            self._head, self._headers, self._chunks = None, {}, []

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ParseError(f"header line without ':': {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        self._head, self._headers = lines[0], headers
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._need = -1
        else:
            try:
                self._need = int(headers.get(b"content-length", b"0"))
            except ValueError:
                raise ParseError(f"bad content-length {headers[b'content-length'][:40]!r}") from None
        return True

    def _read_sized(self) -> bytes | None:
        if len(self._buf) < self._need:
            return None
        body = bytes(self._buf[: self._need])
        del self._buf[: self._need]
        return body

    def _read_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            nl = buf.find(b"\r\n")
            if nl < 0:
                return None
            try:
                size = int(bytes(buf[:nl]).split(b";", 1)[0], 16)
            except ValueError:
                raise ParseError(f"bad chunk size line {bytes(buf[:nl])[:40]!r}") from None
            if size == 0:
                end = buf.find(b"\r\n\r\n", nl)  # the empty line after optional trailers
                if end < 0:
                    return None
                del buf[: end + 4]
                return b"".join(self._chunks)
            if len(buf) < nl + 2 + size + 2:
                return None
            self._chunks.append(bytes(buf[nl + 2 : nl + 2 + size]))
            del buf[: nl + 2 + size + 2]


def request_bytes(method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = Parser()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Message] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for msg in self.parser.feed(data):
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))


@dataclass(slots=True)
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time while the load ran

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0


async def closed_loop(
    host: str, port: int, request: bytes | Callable[[], bytes], *, concurrency: int, seconds: float, max_requests: int,
    rate: float | None = None,
) -> LoadResult:
    """`concurrency` keep-alive connections, each sending the next request when the last answers,
    until `seconds` pass or `max_requests` are sent. Bounded both ways. `request`: the bytes of
    every request, or a function that makes each one (random prompts). `rate`: no faster than this
    many requests/s in all (the n-th starts no earlier than n / rate seconds in), so gateways that
    could go faster are compared at the same load."""
    make = request if callable(request) else (lambda: request)
    loop = asyncio.get_running_loop()
    result = LoadResult()
    sent = 0
    start_at = loop.time()
    deadline = start_at + seconds

    async def worker() -> None:
        nonlocal sent
        conn: _Connection | None = None
        while loop.time() < deadline and sent < max_requests:
            sent += 1
            if rate is not None:
                wait = start_at + sent / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    _, conn = await loop.create_connection(_Connection, host, port)
                conn.waiter = loop.create_future()
                start = time.perf_counter()
                assert conn.transport is not None
                conn.transport.write(make())
                msg = await asyncio.wait_for(conn.waiter, 30)
                elapsed = time.perf_counter() - start
            except (OSError, asyncio.TimeoutError, ParseError) as e:
                result.errors[type(e).__name__] += 1
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                continue
            result.statuses[msg.status] += 1
            if msg.status == 200:
                result.latencies.append(elapsed)
            if msg.headers.get(b"connection", b"").lower() == b"close":
                assert conn.transport is not None
                conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    return result
