"""The ext_proc servicer over a real gRPC stream (an in-process EPP on loopback, no Envoy): the
request-body idle timer and the end of the stream after a refusal, which live around the state machine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.server.runner import EppServer, ServeOptions
from tests.unit.test_protocol import body_msg, headers_msg


@pytest.fixture
async def epp(tmp_path) -> AsyncIterator[EppServer]:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {address: 127.0.0.1, port: 9}\n")
    server = EppServer(ServeOptions(
        grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
        endpoints_file=str(endpoints), request_body_idle_timeout=0.3,
    ))  # fmt: skip
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


async def until_no_stream_is_open(epp: EppServer) -> int:
    for _ in range(100):
        if epp.servicer.active_streams == 0:
            break
        await asyncio.sleep(0.05)
    return epp.servicer.active_streams


async def test_a_stream_whose_body_stalls_gets_408_and_ends(epp):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_msg())
        await call.write(body_msg(b'{"model": "m", ', False))  # and then nothing, the stream left open
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply.immediate_response.status.code == 408
        assert reply.immediate_response.body.startswith(b"inference error: RequestTimeout - no request body data for 0.3 s")
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF  # the EPP ended the stream
        assert await call.code() == grpc.StatusCode.OK
    assert await until_no_stream_is_open(epp) == 0


async def test_a_stream_is_ended_after_its_refusal_without_reading_the_rest(epp):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_msg(extra={"content-length": str(100 * 1024 * 1024)}))
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply.immediate_response.status.code == 413
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    assert await until_no_stream_is_open(epp) == 0


async def test_a_body_sent_without_pauses_is_routed_past_the_idle_timeout(epp):
    body = b'{"model": "m", "prompt": "' + b"p" * 1000 + b'"}'
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(headers_msg())
        for i in range(0, len(body), 100):  # 0.1 s apart, 1 s in all: each wait shorter than the 0.3 s limit
            await asyncio.sleep(0.1)
            await call.write(body_msg(body[i : i + 100], i + 100 >= len(body)))
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply.WhichOneof("response") == "request_headers"
        headers = {h.header.key: h.header.raw_value for h in reply.request_headers.response.header_mutation.set_headers}
        assert headers["x-gateway-destination-endpoint"] == b"127.0.0.1:9"
        await call.done_writing()
        call.cancel()
    assert await until_no_stream_is_open(epp) == 0
    assert epp.datastore.total_in_flight() == 0


def test_no_request_body_idle_timeout_when_it_is_off():
    opts = ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, request_body_idle_timeout=0)
    assert EppServer(opts).servicer.limits.body_idle_timeout is None


async def _epp_with_token_producer(tmp_path, url: str, timeout: str) -> EppServer:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {address: 127.0.0.1, port: 9}\n")
    config = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {{modelName: sim-model, vllm: {{url: "{url}", timeout: {timeout}}}}}
- type: token-load-scorer
- type: max-score-picker
"""
    server = EppServer(ServeOptions(
        grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
        endpoints_file=str(endpoints), config_text=config,
    ))  # fmt: skip
    await server.start()
    return server


@pytest.mark.parametrize("fault", ["none", "hang"])
async def test_the_pick_waits_for_the_model_servers_tokens_at_most_the_producers_timeout(tmp_path, fault):
    """The token-producer's render call runs between the body and the pick, on the servicer's stream:
    answered, the request is routed on the server's token count; hung, on the estimate after the timeout."""
    import aiohttp

    from vllm_sim.config import SimConfig
    from vllm_sim.server import SimServer

    async with SimServer(SimConfig.from_profile("gpu", time_scale=0.01)) as sim:
        async with aiohttp.ClientSession() as http:
            await http.post(f"{sim.control_url}/sim/fault", json={"mode": fault})
        epp = await _epp_with_token_producer(tmp_path, sim.url, "0.5s")
        try:
            body = b'{"model": "sim-model", "prompt": "' + b"p" * 400 + b'", "max_tokens": 1}'
            async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
                call = pb_grpc.ExternalProcessorStub(channel).Process()
                await call.write(headers_msg())
                await call.write(body_msg(body, True))
                reply = await asyncio.wait_for(call.read(), 10)  # never a hang: at most the 0.5 s timeout
                assert reply.WhichOneof("response") == "request_headers"
                (ep,) = epp.datastore.candidates()
                assert ep.in_flight_load_tokens == 100  # the sim's 4-bytes-a-token count, or the estimate: 100 either way
                await call.done_writing()
                call.cancel()
            assert sim.render_calls == (1 if fault == "none" else 0)
            (tp,) = epp.token_producers
            assert dict(tp.fallbacks) == ({} if fault == "none" else {"timeout": 1})
            assert await until_no_stream_is_open(epp) == 0
        finally:
            await epp.stop(0)
