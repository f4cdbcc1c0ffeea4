"""A no-op "vLLM" for the overhead benchmark: one process serving several ports, answering every
POST with the same small completion and /metrics with an idle server's gauges plus a counter of the
completions served, so the body changes between scrapes while traffic flows, as a busy vLLM's does
(the EPP's scraper then parses every scrape, not only the first of a run of identical bodies).

Raw asyncio protocol + uvloop so the backend costs little CPU next to Envoy and the EPP.
Run: python -m bench.noop_backend --port 8001 --port 8002 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from bench.http1 import Parser

COMPLETION = json.dumps({
    "id": "cmpl-noop", "object": "text_completion", "created": 0, "model": "sim-model",
    "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
}).encode()  # fmt: skip

METRICS = b"""\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="sim-model"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="sim-model"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="8000"} 1.0
"""


def _response(body: bytes, content_type: bytes, served_by: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\nx-served-by: " + served_by + b"\r\n\r\n" + body
    )  # fmt: skip


def _metrics(served: int, served_by: bytes) -> bytes:
    line = b'vllm:request_success_total{engine="0",finished_reason="length",model_name="sim-model"} %d.0\n' % served
    return _response(METRICS + b"# TYPE vllm:request_success_total counter\n" + line, b"text/plain; version=0.0.4", served_by)


class _Handler(asyncio.Protocol):
    def __init__(self, completion: bytes, served_by: bytes, empty: bytes, served: list[int]) -> None:
        self._parser = Parser()
        self._answers = (completion, served_by, empty)
        self._served = served  # [completions served on this port], shared by its connections
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        completion, served_by, empty = self._answers
        assert self._transport is not None
        for msg in self._parser.feed(data):
            if msg.start_line.startswith(b"POST"):
                self._served[0] += 1
                self._transport.write(completion)
            elif msg.start_line.startswith(b"GET /metrics"):
                self._transport.write(_metrics(self._served[0], served_by))
            else:
                self._transport.write(empty)


async def serve(ports: Sequence[int], host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        name = f"{host}:{port}".encode()
        answers = (_response(COMPLETION, b"application/json", name), name, _response(b"{}", b"application/json", name), [0])
        servers.append(await loop.create_server(lambda a=answers: _Handler(*a), host, port, backlog=1024))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.noop_backend")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", required=True, help="a port to serve, repeatable")
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.host))
    else:
        uvloop.run(serve(args.port, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
