"""Loopback ports that cannot be raced: reserved by the process that hands them out, for as long as
it needs them.

Binding port 0, closing the socket and handing the number to a process that binds it later leaves a
window in which any other bind to port 0 on the machine (a parallel test's server, another such
helper, a client bound to a source address before it connects) can take the number. A `ReservedPort`
closes the window: it keeps a socket bound to the port with SO_REUSEADDR and never listens on it.
On Linux that holds the port against every bind to port 0 and every outgoing connection's automatic
choice, while a child that binds that exact port with SO_REUSEADDR (aiohttp, gRPC, Envoy, ZMQ and
uvicorn all set it) can still listen there. When the child dies the port stays held, so a restarted
child gets the same one. Elsewhere (BSD semantics) a child cannot share the bind: `hand_over()` lets
the port go just before the child starts, as the old helpers did.
"""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass

# Whether a child can bind a port this process holds (Linux: a bound, non-listening SO_REUSEADDR
# socket does not conflict with another SO_REUSEADDR bind of the exact port; BSD needs SO_REUSEPORT
# on both sides).
HELD_WHILE_SERVED = sys.platform.startswith("linux")


class PortUnavailable(RuntimeError):
    """A port asked for by number is taken (something listens there)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"port {port} on {host} is not available ({reason})")
        self.host = host
        self.port = port


@dataclass(slots=True, eq=False)
class ReservedPort:
    """A port held for a child that binds it later, and again after each restart. `close()` frees it."""

    host: str
    port: int
    _sock: socket.socket | None

    def hand_over(self) -> None:
        """The child binding this port is about to start: let the port go where it cannot be shared."""
        if not HELD_WHILE_SERVED:
            self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def held(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> ReservedPort:
    """Hold `port` on `host` (0: one the kernel picks, never one in use). Raises PortUnavailable when
    a port asked for by number already has a listener."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortUnavailable(host, port, "already in use") from None
        raise PortUnavailable(host, port, e.strerror or str(e)) from None
    return ReservedPort(host, int(sock.getsockname()[1]), sock)
