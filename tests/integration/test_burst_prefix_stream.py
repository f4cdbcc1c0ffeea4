"""burst-prefix-cache-producer's window on the real servicer over gRPC (an in-process EPP on loopback,
no Envoy): the streams of one window are answered together with one destination, and a stream whose
client leaves while it waits leaves the window and the books clean."""

from __future__ import annotations

import asyncio
import json

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.server.runner import EppServer, ServeOptions
from pickers.plugins.producer.burst_prefix import BurstPrefixCacheProducer
from tests.integration.test_ext_proc_stream import until_no_stream_is_open
from tests.unit.test_protocol import body_msg, headers_msg

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: burst-prefix-cache-producer
  parameters: {windowDurationMs: 10000}   # sealed by the test, never by the timer
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer}]
"""
BODY = json.dumps({"model": "m", "prompt": "Solve, then check: " * 200, "max_tokens": 4}).encode()


async def waiting(burst: BurstPrefixCacheProducer, n: int) -> None:
    for _ in range(200):
        if burst._open is not None and burst._open.size == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} requests never waited in the window")


async def test_one_window_answers_its_streams_together_and_a_client_that_left_leaves_it(tmp_path):
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n" + "".join(f"- {{address: 127.0.0.{i}, port: 9}}\n" for i in range(1, 5)))
    server = EppServer(ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
                                    endpoints_file=str(endpoints), config_text=CONFIG))  # fmt: skip
    await server.start()
    try:
        burst = server.scheduler.async_producers[0]
        assert isinstance(burst, BurstPrefixCacheProducer)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            calls = [pb_grpc.ExternalProcessorStub(channel).Process() for _ in range(4)]
            for call in calls:
                await call.write(headers_msg())
                await call.write(body_msg(BODY, True))
            await waiting(burst, 4)
            calls[3].cancel()  # the client went away while it waited
            await waiting(burst, 3)
            burst.close()  # the window is over
            destinations = set()
            for call in calls[:3]:
                reply = await asyncio.wait_for(call.read(), 10)
                headers = {h.header.key: h.header.raw_value for h in reply.request_headers.response.header_mutation.set_headers}
                destinations.add(headers["x-gateway-destination-endpoint"])
                call.cancel()
        assert len(destinations) == 1
        assert (burst.counts["assigned"], burst.counts["cancelled"]) == (3, 1)
        assert await until_no_stream_is_open(server) == 0
        assert server.datastore.total_in_flight() == 0
    finally:
        await server.stop(0)
