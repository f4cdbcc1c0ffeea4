"""The pollers' keep-alive GET client (extproc/datalayer/http_get.py) against real sockets: a server
started in the test writes exactly the bytes each case needs (framing, errors, closes, silence)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from extproc.datalayer.http_get import HttpGetError, HttpGetter

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"



class ThenClose(bytes):
    """An answer after which the server closes the connection."""


# One answer: the bytes to write (a list: written one by one with a pause, to split them over reads;
# ThenClose: then close), or None: say nothing and close, or ... (Ellipsis): say nothing, stay open.
Answer = bytes | Sequence[bytes] | None | type(Ellipsis)


async def get(client: HttpGetter, url: str) -> tuple[int, bytes]:
    return await asyncio.wait_for(client.get(url), 5)  # a bug here fails the test, never hangs it


class Server:
    """Answers the n-th request on a connection with `script(connection number, request number)`."""

    def __init__(self, script: Callable[[int, int], Answer]) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/metrics"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn, n = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                n += 1
                answer = self.script(conn, n)
                if answer is None:
                    return
                if answer is Ellipsis:
                    await asyncio.sleep(3600)
                    return
                parts = [answer] if isinstance(answer, bytes) else list(answer)
                for part in parts:
                    writer.write(part)
                    await writer.drain()
                    if len(parts) > 1:
                        await asyncio.sleep(0.002)
                if isinstance(answer, ThenClose):
                    return
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def client() -> AsyncIterator[HttpGetter]:
    getter = HttpGetter(max_bytes=1000)
    yield getter
    await getter.close()


async def test_a_content_length_answer_and_one_connection_for_many_fetches(client: HttpGetter) -> None:
    async with Server(lambda c, n: OK) as srv:
        for _ in range(5):
            assert await get(client, srv.url) == (200, b"hello")
    assert srv.connections == 1
    assert len(srv.requests) == 5
    assert srv.requests[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_a_chunked_answer_split_over_many_reads_with_extensions_and_trailers(client: HttpGetter) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    async with Server(lambda c, n: [answer[i : i + 3] for i in range(0, len(answer), 3)]) as srv:
        assert await get(client, srv.url) == (200, b"hello, world")
        assert await get(client, srv.url) == (200, b"hello, world")  # and the connection is still good
    assert srv.connections == 1


async def test_a_body_framed_by_the_close_and_http_1_0_are_read_then_not_reused(client: HttpGetter) -> None:
    answers = {1: ThenClose(b"HTTP/1.1 200 OK\r\n\r\nuntil close"), 2: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
               3: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 4: OK}  # fmt: skip

    def script(c: int, n: int) -> Answer:
        return answers[c] if n == 1 else None

    async with Server(script) as srv:
        assert await get(client, srv.url) == (200, b"until close")
        assert await get(client, srv.url) == (200, b"ok")
        assert await get(client, srv.url) == (200, b"ok")
        assert await get(client, srv.url) == (200, b"hello")
    assert srv.connections == 4


async def test_other_statuses_are_returned_and_redirects_not_followed(client: HttpGetter) -> None:
    answers = [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
               b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
               b"HTTP/1.1 204 No Content\r\n\r\n"]  # fmt: skip
    async with Server(lambda c, n: answers[n - 1]) as srv:
        assert await get(client, srv.url) == (503, b"busy")
        assert await get(client, srv.url) == (302, b"")
        assert await get(client, srv.url) == (204, b"")
    assert len(srv.requests) == 3 and srv.connections == 1  # nothing fetched from /elsewhere


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "answer of 5000 bytes; at most 1000 are read"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n1\r\n", "answer over 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1001, "answer over 1000 bytes"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 OK\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed answer header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer-encoding b'gzip' is not supported"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "no CRLF after its data"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, "answer headers over 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed before the answer was complete"),
    ],
    ids=["length over cap", "chunks over cap", "close-framed over cap", "not http", "no status code", "header line",
         "content-length", "transfer-encoding", "chunk size", "chunk crlf", "huge head", "cut short"],
)  # fmt: skip
async def test_a_bad_answer_is_a_clear_error_and_the_next_fetch_starts_afresh(client: HttpGetter, answer: bytes, message: str) -> None:
    async with Server(lambda c, n: ThenClose(answer) if c == 1 else OK) as srv:
        with pytest.raises(HttpGetError, match=message.replace("(", r"\(").replace(")", r"\)")):
            await get(client, srv.url)
        assert await get(client, srv.url) == (200, b"hello")
    assert srv.connections == 2  # the failed connection was dropped, not reused


async def test_a_kept_alive_connection_the_server_closes_as_a_request_goes_out_is_retried_once(client: HttpGetter) -> None:
    async with Server(lambda c, n: OK if n == 1 else None) as srv:  # answers once, closes at the second request
        for _ in range(3):
            assert await get(client, srv.url) == (200, b"hello")  # not an error: sent again on a new one
    assert srv.connections == 3 and len(srv.requests) == 5


async def test_a_connection_the_server_closed_while_idle_is_replaced(client: HttpGetter) -> None:
    async with Server(lambda c, n: ThenClose(OK)) as srv:
        for _ in range(3):
            assert await get(client, srv.url) == (200, b"hello")
            await asyncio.sleep(0.02)  # the close arrives while the connection is idle
    assert srv.connections == 3 and len(srv.requests) == 3  # no request was lost to a closed connection


async def test_a_fresh_connection_closed_unanswered_is_an_error_not_a_loop(client: HttpGetter) -> None:
    async with Server(lambda c, n: None) as srv:
        with pytest.raises(HttpGetError, match="closed before any answer"):
            await client.get(srv.url)
    assert srv.connections == 1


async def test_a_server_that_never_answers_is_cancelled_by_the_timeout_and_its_connection_dropped(client: HttpGetter) -> None:
    async with Server(lambda c, n: ... if c == 1 else OK) as srv:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.get(srv.url)
        assert await get(client, srv.url) == (200, b"hello")
    assert srv.connections == 2


async def test_a_server_that_never_answers_times_out_by_the_gets_own_timer(client: HttpGetter) -> None:
    """get(url, timeout): TimeoutError on the kept-alive connection too (not only on a fresh one), that
    connection closed, and the next GET answered on a new one; a GET answered in time leaves no timer."""
    async with Server(lambda c, n: OK if (c, n) != (1, 2) else ...) as srv:
        assert await get(client, srv.url) == (200, b"hello")
        with pytest.raises(TimeoutError, match="no complete answer within the timeout"):  # not wait_for's
            await asyncio.wait_for(client.get(srv.url, 0.2), 5)  # the second request on connection 1: never answered
        assert await client.get(srv.url, 5.0) == (200, b"hello")
    assert srv.connections == 2
    loop = asyncio.get_running_loop()
    assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled() and "expire" in repr(h)]


async def test_a_connect_that_hangs_times_out(client: HttpGetter, monkeypatch) -> None:
    loop = asyncio.get_running_loop()

    async def hang(*args, **kwargs):  # a SYN to a host that drops it
        await asyncio.Event().wait()

    monkeypatch.setattr(loop, "create_connection", hang)
    with pytest.raises(TimeoutError, match="no connection within the timeout"):
        await asyncio.wait_for(client.get("http://10.255.255.1:8000/metrics", 0.1), 5)


async def test_a_refused_connection_is_an_os_error(client: HttpGetter) -> None:
    async with Server(lambda c, n: OK) as srv:
        url = srv.url
    await asyncio.sleep(0.01)
    with pytest.raises(OSError):
        await client.get(url)


async def test_urls_that_are_not_http_are_refused(client: HttpGetter) -> None:
    for url in ("ftp://127.0.0.1/metrics", "http:///metrics", "/metrics"):
        with pytest.raises(HttpGetError, match="only http and https URLs"):
            await client.get(url)


async def test_drop_closes_the_idle_connection_of_a_url(client: HttpGetter) -> None:
    async with Server(lambda c, n: OK) as srv:
        await client.get(srv.url)
        client.drop(srv.url)
        await client.get(srv.url)
    assert srv.connections == 2
