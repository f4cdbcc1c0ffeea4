"""Reserved ports (extproc/devstack/ports.py): held against every other socket, yet bindable by the
child they are for, before and after it dies. The stress run against real processes under port churn
is tests/integration/test_port_race.py."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
from aiohttp import web

from extproc.devstack.ports import HELD_WHILE_SERVED, PortUnavailable, reserve_port

pytestmark = pytest.mark.skipif(not HELD_WHILE_SERVED, reason="ports are held while served on Linux only")


def _bind(port: int, *, reuse: bool, reuseport: bool = False, listen: bool = True) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(("127.0.0.1", port))
        if listen:
            s.listen()
    except OSError:
        s.close()
        raise
    return s


def test_a_reserved_port_refuses_a_plain_bind():
    with reserve_port() as r:
        with pytest.raises(OSError) as e:
            _bind(r.port, reuse=False)
        assert e.value.errno == errno.EADDRINUSE


def test_a_child_binding_with_reuseaddr_listens_on_a_reserved_port():
    with reserve_port() as r:
        server = _bind(r.port, reuse=True)
        with server, socket.create_connection(("127.0.0.1", r.port), timeout=5):
            pass


def test_a_reuseport_server_like_vllms_listens_on_a_reserved_port():
    with reserve_port() as r:
        _bind(r.port, reuse=True, reuseport=True).close()


def test_nothing_else_binds_a_reserved_port_while_its_child_listens():
    with reserve_port() as r, _bind(r.port, reuse=True):
        with pytest.raises(OSError) as e:
            _bind(r.port, reuse=True)
        assert e.value.errno == errno.EADDRINUSE


def test_a_reserved_port_stays_held_after_its_child_is_gone_and_takes_the_next_one():
    with reserve_port() as r:
        _bind(r.port, reuse=True).close()  # the child dies
        with pytest.raises(OSError):
            _bind(r.port, reuse=False)
        _bind(r.port, reuse=True).close()  # its restart binds again


def test_a_reserved_port_refuses_connections_while_nothing_serves_it():
    with reserve_port() as r, pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", r.port), timeout=5)


def test_closing_a_reservation_frees_the_port():
    r = reserve_port()
    r.close()
    assert not r.held
    _bind(r.port, reuse=False).close()


def test_reservations_are_distinct():
    held = [reserve_port() for _ in range(50)]
    try:
        assert len({r.port for r in held}) == 50
    finally:
        for r in held:
            r.close()


def test_a_port_asked_for_by_number_that_has_a_listener_is_unavailable():
    with reserve_port() as r, _bind(r.port, reuse=True):
        with pytest.raises(PortUnavailable, match=rf"port {r.port} on 127.0.0.1 is not available \(already in use\)"):
            reserve_port("127.0.0.1", r.port)


async def test_an_aiohttp_server_serves_on_a_reserved_port_and_again_after_a_restart():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    with reserve_port() as r:
        for _ in range(2):
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", r.port).start()
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert (await reader.read()).endswith(b"hi")
            writer.close()
            await runner.cleanup()
