"""A no-op Python ext_proc server for the overhead benchmark: the floor any Python ext_proc server pays
(grpc.aio, protobuf, the event loop) in the processing mode Envoy uses, with no parsing, no pick and
no bookkeeping. It sends every request to one fixed destination, hands each body chunk straight back
(FULL_DUPLEX_STREAMED needs that) and answers every other message with an empty response. It reads
and writes the stream the way the EPP's servicer does (context.read/write, uvloop), and serves gRPC
health on a second port for Envoy's health check.

`--burn-us N` makes it spend N microseconds of CPU in Python per request (at the request body's end,
where the EPP picks): the same server with a request path as dear as the EPP's, so bench.overhead shows
what that much Python per request costs at full load, apart from what the EPP does with it.

Run: python -m bench.noop_extproc --port 9002 --health-port 9003 --destination 127.0.0.1:8001 [--burn-us 100]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"


class NoopServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str, burn_us: float = 0.0, epp_answers: bool = False) -> None:
        self.destination = destination.encode()
        self.burn_s = burn_us / 1e6
        self.epp_answers = epp_answers
        # --epp-answers: the answer to the request's headers, built once but for its content-length (the
        # EPP's for a request that keeps its request id: the destination and the body's length in
        # headers, the route cache cleared, the destination in envoy.lb)
        routed = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=self._route()))
        routed.request_headers.response.header_mutation.set_headers[0].append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        routed.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = destination
        self._routed = routed

    def _route(self) -> pb.CommonResponse:
        header = base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=self.destination)
        return pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(header=header)]), clear_route_cache=True
        )

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        read, write, eof = context.read, context.write, grpc.aio.EOF
        if self.epp_answers:
            await self._process_as_epp(read, write, eof)
            return
        while (msg := await read()) is not eof:
            event = msg.WhichOneof("request")
            if event == "request_headers":
                await write(pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=self._route())))
            elif event == "request_body":
                if self.burn_s and msg.request_body.end_of_stream:
                    _burn(self.burn_s)
                await write(_streamed(msg.request_body, request=True))
            elif event in _PLAIN:
                await write(_plain_answer(msg, event))

    async def _process_as_epp(self, read: object, write: object, eof: object) -> None:
        """The EPP's order of answers: nothing for the request headers, the body held until its end, then
        the routed headers answer and the body handed back; the response's headers and body answered as
        they come."""
        held: list[bytes] = []
        while (msg := await read()) is not eof:  # type: ignore[operator]
            event = msg.WhichOneof("request")
            if event == "request_body":
                body = msg.request_body
                held.append(body.body)
                if body.end_of_stream:
                    if self.burn_s:
                        _burn(self.burn_s)
                    raw = b"".join(held)
                    routed = pb.ProcessingResponse()
                    routed.CopyFrom(self._routed)
                    length = routed.request_headers.response.header_mutation.set_headers.add()
                    length.header.key, length.header.raw_value = "content-length", str(len(raw)).encode()
                    length.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
                    await write(routed)  # type: ignore[operator]
                    await write(_streamed(pb.HttpBody(body=raw, end_of_stream=True), request=True))  # type: ignore[operator]
            elif event in _PLAIN:  # the request headers are answered at the body's end
                await write(_plain_answer(msg, event))  # type: ignore[operator]


_PLAIN = frozenset({"response_headers", "response_body", "request_trailers", "response_trailers"})


def _plain_answer(msg: pb.ProcessingRequest, event: str) -> pb.ProcessingResponse:
    """The answer to a response-phase message or to trailers: both modes answer them alike."""
    if event == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if event == "response_body":
        return _streamed(msg.response_body, request=False)
    if event == "request_trailers":
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def _burn(seconds: float) -> None:
    """Spend this much of the thread's CPU time (not wall time: a preempted loop does not count)."""
    clock = time.thread_time
    until = clock() + seconds
    while clock() < until:
        pass


def _streamed(body: pb.HttpBody, *, request: bool) -> pb.ProcessingResponse:
    answer = pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=body.body, end_of_stream=body.end_of_stream))
        )
    )
    return pb.ProcessingResponse(request_body=answer) if request else pb.ProcessingResponse(response_body=answer)


async def serve(
    port: int, health_port: int, destination: str, host: str = "127.0.0.1", burn_us: float = 0.0, epp_answers: bool = False
) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopServicer(destination, burn_us, epp_answers), server)
    server.add_insecure_port(f"{host}:{port}")
    health = health_aio.HealthServicer()
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
    health_server.add_insecure_port(f"{host}:{health_port}")
    await server.start()
    await health_server.start()
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    await health_server.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.noop_extproc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="ext_proc gRPC port")
    ap.add_argument("--health-port", type=int, required=True, help="gRPC health port")
    ap.add_argument("--destination", required=True, help="ip:port every request goes to")
    ap.add_argument("--burn-us", type=float, default=0.0, help="CPU microseconds of Python to spend per request (default 0)")
    ap.add_argument(
        "--epp-answers", action="store_true",
        help="answer in the EPP's order and with its routed answer (headers answered at the body's end, envoy.lb metadata)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.burn_us < 0:
        ap.error("--burn-us: must be >= 0")
    served = serve(args.port, args.health_port, args.destination, args.host, args.burn_us, args.epp_answers)
    try:
        import uvloop
    except ImportError:
        asyncio.run(served)
    else:
        uvloop.run(served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
