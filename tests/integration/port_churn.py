"""A process that churns through loopback ports, as a busy machine does: `python -m
tests.integration.port_churn --held N --rate R` keeps about N loopback sockets open, opening R a
second and closing the oldest (connections with a reset, so no TIME_WAIT is left behind and each
port goes back as soon as it is closed). A third are plain outgoing connections, a third are bound to
port 0 before they connect (a client with a source address), a third listen on port 0 (another
test's server). On Linux connect() alone prefers even ports and bind(0) odd ones, so it is the
last two that take the odd port a `free_port()` helper handed out. Prints `ready` once N are open.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time
from collections import deque

RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s


def _accept(sink: socket.socket) -> None:
    while True:
        conn, _ = sink.accept()
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="port_churn")
    p.add_argument("--held", type=int, default=2000)
    p.add_argument("--rate", type=float, default=2000.0, help="new connections a second")
    args = p.parse_args(argv)
    sink = socket.socket()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sink.bind(("127.0.0.1", 0))
    sink.listen(4096)
    threading.Thread(target=_accept, args=(sink,), daemon=True).start()
    held: deque[socket.socket] = deque()
    n = 0
    started = time.monotonic()
    ready = False
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        try:
            if n % 3:
                s.bind(("127.0.0.1", 0))
            if n % 3 == 2:
                s.listen()
            else:
                s.connect(sink.getsockname())
        except OSError:
            s.close()
            continue
        n += 1
        held.append(s)
        if len(held) > args.held:
            held.popleft().close()
        elif len(held) == args.held and not ready:
            print("ready", flush=True)
            ready = True
        ahead = started + n / args.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


if __name__ == "__main__":
    sys.exit(main())
