"""A small keep-alive HTTP/1.1 GET client for the pollers (metrics, /v1/models, DCGM).

Each poller fetches one URL from one endpoint every 50 ms or so, forever: a general client's cost per
request (aiohttp's: a request and a response object, header multidicts, a timeout handle, a
connection-pool lookup; ~0.5 ms of CPU) is paid 20 times a second per endpoint, whether or not any
request is being routed. Here one `HttpGetter` holds one connection per (scheme, host, port), sends a
request line built once per URL, and reads the answer in an asyncio Protocol: status line,
`content-length` or chunked framing, nothing else kept. TLS is the loop's (`ssl=`); no redirects are
followed and no proxy is used (aiohttp's defaults were the same but for redirects: a poller's URL
that redirects is an error here, with its status).

Errors are `HttpGetError` (bad framing, a body over the cap, a closed connection) or OSError/TimeoutError
from the connect; a connection that failed in any way is closed and the next fetch opens a new one. A
kept-alive connection the server closed while it was idle (it answers a request with a close and not
one byte) is not an error: the GET is sent once more on a new connection, as HTTP clients do.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

_HEADERS_MAX = 64 * 1024  # a status line and headers larger than this are not a metrics server's


class HttpGetError(Exception):
    """An answer that could not be read (bad framing, too large, the connection closed early)."""


class _ClosedUnanswered(HttpGetError):
    """The connection closed before any byte of the answer came: on a kept-alive connection, the
    server closed it while idle as the request went out (a GET is then sent again, once)."""


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    request: bytes  # the whole GET request, built once


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. `answer` resolves to (status, body)."""

    def __init__(self, cap: int | None, loop: asyncio.AbstractEventLoop) -> None:
        self.cap = cap
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._received = False  # any byte of the current answer
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._head_done = False
        self._length: int | None = None  # content-length; None: chunked, or (with _until_close) to the close
        self._chunked = False
        self._until_close = False
        self._keep_alive = True
        self._body = bytearray()  # a chunked body, decoded so far
        self._chunk_left = -1  # bytes left of the current chunk; -1: a size line is due

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._fail(HttpGetError("the server sent data no request asked for"))
            return
        self._received = True
        self._buf += data
        try:
            self._parse()
        except HttpGetError as e:
            self._fail(e)

    def eof_received(self) -> bool | None:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._head_done and self._until_close:  # a body framed by the close
            self._deliver(bytes(self._buf))
            return
        if not self._received:
            waiter.set_exception(_ClosedUnanswered(f"the connection closed before any answer{f' ({exc})' if exc else ''}"))
            return
        waiter.set_exception(HttpGetError(f"the connection closed before the answer was complete{f' ({exc})' if exc else ''}"))

    # -- one request ----------------------------------------------------------------------------
    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self._reset()
        self._buf.clear()
        self._received = False
        self._waiter = self.loop.create_future()
        self.transport.write(request)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def expire(self, answer: asyncio.Future[tuple[int, bytes]]) -> None:
        """The GET's deadline passed: it fails with TimeoutError (if that answer is still awaited)."""
        if answer is self._waiter and not answer.done():
            answer.set_exception(TimeoutError("no complete answer within the timeout"))

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def _deliver(self, body: bytes) -> None:
        waiter = self._waiter
        if not self._keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body))

    def _parse(self) -> None:
        buf = self._buf
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _HEADERS_MAX:
                    raise HttpGetError(f"answer headers over {_HEADERS_MAX} bytes")
                return
            self._read_head(bytes(buf[:end]))
            del buf[: end + 4]
            self._head_done = True
        cap = self.cap
        if self._chunked:
            self._read_chunks()
            return
        if self._until_close:
            if cap is not None and len(buf) > cap:
                raise HttpGetError(f"answer over {cap} bytes; at most {cap} are read")
            return
        length = self._length
        assert length is not None
        if len(buf) >= length:
            body = bytes(buf[:length])
            del buf[:length]
            self._deliver(body)

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpGetError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        self._status = int(parts[1])
        if parts[0] == b"HTTP/1.0":
            self._keep_alive = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpGetError(f"malformed answer header line: {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit():
                    raise HttpGetError(f"bad content-length {value[:40]!r}")
                self._length = int(value)
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise HttpGetError(f"transfer-encoding {value.strip()[:40]!r} is not supported")
                self._chunked = True
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    self._keep_alive = False
                elif token == b"keep-alive":
                    self._keep_alive = True
        cap = self.cap
        if self._chunked:
            self._length = None
        elif self._length is None:
            if self._status in (204, 304) or 100 <= self._status < 200:
                self._length = 0
            else:
                self._until_close = True
                self._keep_alive = False
        elif cap is not None and self._length > cap:
            raise HttpGetError(f"answer of {self._length} bytes; at most {cap} are read")

    def _read_chunks(self) -> None:
        buf, body, cap = self._buf, self._body, self.cap
        while True:
            if self._chunk_left < 0:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > 1024:
                        raise HttpGetError("malformed chunk size line")
                    return
                size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpGetError(f"malformed chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise HttpGetError(f"malformed chunk size {size_text[:20]!r}")
                if size == 0:  # the last chunk: then any trailers, up to an empty line
                    end = eol if buf[eol : eol + 4] == b"\r\n\r\n" else buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        return
                    del buf[: end + 4]
                    self._deliver(bytes(body))
                    return
                if cap is not None and len(body) + size > cap:
                    raise HttpGetError(f"answer over {cap} bytes; at most {cap} are read")
                del buf[: eol + 2]
                self._chunk_left = size
            if len(buf) < self._chunk_left + 2:
                return
            n = self._chunk_left
            if buf[n : n + 2] != b"\r\n":
                raise HttpGetError("malformed chunk: no CRLF after its data")
            body += buf[:n]
            del buf[: n + 2]
            self._chunk_left = -1


class HttpGetter:
    """GETs URLs over kept-alive connections, one per (scheme, host, port): `get(url)` -> (status, body).

    One request at a time per connection: the pollers fetch one URL per endpoint in turn. A second `get`
    for the same server while one is on the wire opens a second connection for itself."""

    def __init__(self, ssl_ctx: ssl.SSLContext | None = None, *, max_bytes: int | None = None) -> None:
        self.ssl_ctx = ssl_ctx
        self.max_bytes = max_bytes
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on (one client per loop)
        self._busy: set[_Connection] = set()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HttpGetError(f"cannot fetch {url!r}: only http and https URLs")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host_header = parts.netloc.rsplit("@", 1)[-1]
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: text/plain\r\n"
                "Accept-Encoding: identity\r\nUser-Agent: llm-epp\r\n\r\n"
            ).encode("latin-1")
            host = parts.hostname
            if len(self._targets) > 4096:  # endpoints come and go: keep the cache bounded
                self._targets.clear()
            target = self._targets[url] = _Target(parts.scheme, host, port, request)
        return target

    async def get(self, url: str, timeout: float | None = None) -> tuple[int, bytes]:
        """One GET; raises HttpGetError, OSError (connect), ssl.SSLError, and TimeoutError when the answer
        is not complete `timeout` seconds after the call (one timer on the loop, not a timeout context
        per fetch: the pollers make thousands a second). Cancelling it works too. Either way the
        connection it used is closed."""
        loop = self._loop
        if loop is None:  # each asyncio.get_running_loop() is a getpid() on Python 3.11: once per client
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        target = self._target(url)
        key = (target.scheme, target.host, target.port)
        conn = self._idle.pop(key, None)
        reused = conn is not None and not conn.closed
        if conn is None or conn.closed:
            conn = await self._connect(target, deadline)
        try:
            answer = await self._send(conn, target, deadline)
        except _ClosedUnanswered:
            if not reused:
                raise
            conn = await self._connect(target, deadline)  # the server had closed the idle connection: once more
            answer = await self._send(conn, target, deadline)
        if not conn.closed:
            old = self._idle.get(key)
            if old is not None:
                old.close()
            self._idle[key] = conn
        return answer

    async def _send(self, conn: _Connection, target: _Target, deadline: float | None) -> tuple[int, bytes]:
        self._busy.add(conn)
        answer = conn.send(target.request)
        timer = None if deadline is None else conn.loop.call_at(deadline, conn.expire, answer)
        try:
            return await answer
        except BaseException:
            conn.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._busy.discard(conn)

    async def _connect(self, target: _Target, deadline: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        self._loop = loop
        ssl_arg: ssl.SSLContext | None = None
        if target.scheme == "https":
            ssl_arg = self.ssl_ctx if self.ssl_ctx is not None else ssl.create_default_context()
        cap = self.max_bytes
        try:
            async with asyncio.timeout_at(deadline):  # connects are rare: a kept-alive connection is reused
                _, conn = await loop.create_connection(
                    lambda: _Connection(cap, loop), target.host, target.port, ssl=ssl_arg,
                    server_hostname=target.host if ssl_arg is not None else None,
                )  # fmt: skip
        except TimeoutError:
            raise TimeoutError("no connection within the timeout") from None
        return conn

    def drop(self, url: str) -> None:
        """Forget a URL (its endpoint left): close its idle connection."""
        target = self._targets.pop(url, None)
        if target is not None:
            conn = self._idle.pop((target.scheme, target.host, target.port), None)
            if conn is not None:
                conn.close()

    async def close(self) -> None:
        for conn in (*self._idle.values(), *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports finish closing
