"""The P/D sidecar in front of a decode simulator: plain proxying, the two legs, fallbacks, errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from pd_sidecar import Sidecar
from pd_sidecar.legs import PREFILL_KV_TRANSFER_PARAMS
from tests.pd.conftest import DeadPort, StartRecorder, StartSidecar, StartSim, sample
from vllm_sim import SimServer

PREFILLER = "x-prefiller-host-port"
ENCODERS = "x-encoder-hosts-ports"
KV_FROM_FAKE_PREFILL = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2],
                        "remote_engine_id": "fake-prefill", "remote_host": "127.0.0.1", "remote_port": 1}


def tokens(tag: int, n: int) -> list[int]:
    return [tag * 10000 + i for i in range(n)]


def host_port(sim: SimServer) -> str:
    return f"127.0.0.1:{sim.port}"


async def post(http: aiohttp.ClientSession, sidecar: Sidecar, body: Any, headers: dict[str, str] | None = None,
               path: str = "/v1/completions") -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    async with http.post(sidecar.url + path, data=data, headers=headers or {}) as r:
        text = await r.text()
        parsed = text if r.content_type == "text/event-stream" else msgspec.json.decode(text)
        return r.status, parsed, r.headers


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    async with http.get(sim.url + "/sim/stats") as r:
        return await r.json()


async def own_metrics(http: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    async with http.get(sidecar.url + "/sidecar/metrics") as r:
        return await r.text()


# ---- no header: a plain proxy -------------------------------------------------------------------

async def test_without_header_proxies_unchanged(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    decoder = await start_sim(name="decode-0")
    sidecar = await start_sidecar(decoder.url)
    status, body, headers = await post(http, sidecar, {"prompt": tokens(1, 40), "max_tokens": 3},
                                       headers={"x-request-id": "client-1"})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert headers["x-served-by"] == "decode-0"
    s = await stats(http, decoder)
    assert (s["requests_total"], s["prefill_legs_total"], s["decode_legs_total"]) == (1, 0, 0)
    assert s["request_ids"] == ["client-1"]
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_requests_total", 'path="proxy"') == 1


async def test_without_header_streams_chunk_by_chunk(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    decoder = await start_sim(time_scale=0.5)  # 100 tokens x 4 ms
    sidecar = await start_sidecar(decoder.url)
    start = time.perf_counter()
    async with http.post(sidecar.url + "/v1/completions",
                         json={"prompt": tokens(1, 10), "max_tokens": 100, "stream": True}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        first = await r.content.readline()
        first_at = time.perf_counter() - start
        rest = await r.read()
        total = time.perf_counter() - start
    assert first.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
    assert first_at < total / 3


async def test_upstream_errors_pass_through_with_status_and_body(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar((await start_sim()).url)
    status, body, _ = await post(http, sidecar, {"model": "no-such-model", "prompt": "hi"})
    assert status == 404 and "no-such-model" in body["message"]


async def test_health_is_the_decoders(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar, dead_port: DeadPort) -> None:
    alive = await start_sidecar((await start_sim()).url)
    dead = await start_sidecar(f"http://127.0.0.1:{dead_port()}")
    async with http.get(alive.url + "/health") as r:
        assert r.status == 200
    async with http.get(dead.url + "/health") as r:
        assert r.status == 502


async def test_metrics_serve_sidecar_and_decoder_metrics(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar((await start_sim()).url)
    async with http.get(sidecar.url + "/metrics") as r:
        text = await r.text()
    assert "pd_sidecar_requests_total" in text and "vllm:num_requests_running" in text


# ---- with the header: prefill leg, then decode leg ----------------------------------------------

async def test_header_sends_prefill_leg_then_decode_leg(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    prefill, decoder = await start_sim(name="prefill-0"), await start_sim(name="decode-0")
    sidecar = await start_sidecar(decoder.url)
    status, body, headers = await post(http, sidecar, {"prompt": tokens(1, 200), "max_tokens": 7},
                                       headers={PREFILLER: host_port(prefill), "x-request-id": "client-1"})
    assert status == 200 and headers["x-served-by"] == "decode-0"
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 200  # all of it came from prefill-0
    p, d = await stats(http, prefill), await stats(http, decoder)
    assert (p["prefill_legs_total"], p["decode_legs_total"], p["generation_tokens_total"]) == (1, 0, 1)
    assert (d["prefill_legs_total"], d["decode_legs_total"], d["kv_transfer_tokens_total"]) == (0, 1, 200)
    assert d["request_ids"] == ["client-1"]
    assert len(p["request_ids"]) == 1 and p["request_ids"] != ["client-1"]  # a fresh id for the leg
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_requests_total", 'path="disaggregated"') == 1


async def test_disaggregated_streaming_chat_keeps_the_clients_limits_and_usage(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    prefill, decoder = await start_sim(), await start_sim()
    sidecar = await start_sidecar(decoder.url)
    status, text, headers = await post(
        http, sidecar,
        {"messages": [{"role": "user", "content": "tell me " * 100}], "max_completion_tokens": 5,
         "stream": True, "stream_options": {"include_usage": True}},
        headers={PREFILLER: host_port(prefill)}, path="/v1/chat/completions")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [msgspec.json.decode(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) == 5
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    assert text.endswith("data: [DONE]\n\n")
    assert (await stats(http, prefill))["prefill_legs_total"] == 1
    assert (await stats(http, decoder))["decode_legs_total"] == 1


async def test_legs_carry_the_right_bodies_and_the_header_never_leaks(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    prefill = await start_recorder(answer={"choices": [], "kv_transfer_params": KV_FROM_FAKE_PREFILL})
    decoder = await start_recorder()
    sidecar = await start_sidecar(decoder.url)
    client_body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                   "stream_options": {"include_usage": True}, "max_tokens": 50, "max_completion_tokens": 40,
                   "min_tokens": 3, "temperature": 0.5}
    prefill_port = prefill.url.rsplit(":", 1)[1]
    status, _, _ = await post(http, sidecar, client_body, path="/v1/chat/completions?x=1",
                              headers={PREFILLER: f"127.0.0.1:{prefill_port}", "x-request-id": "client-1",
                                       "authorization": "Bearer t"})
    assert status == 200
    [p], [d] = prefill.seen, decoder.seen
    assert p.path == d.path == "/v1/chat/completions?x=1"
    assert p.body == {"model": "m", "messages": client_body["messages"], "stream": False, "max_tokens": 1,
                      "max_completion_tokens": 1, "temperature": 0.5,
                      "kv_transfer_params": PREFILL_KV_TRANSFER_PARAMS}
    assert d.body == {**client_body, "kv_transfer_params": KV_FROM_FAKE_PREFILL}
    assert PREFILLER not in p.headers and PREFILLER not in d.headers
    assert d.headers["x-request-id"] == "client-1" and p.headers["x-request-id"] != "client-1"
    assert p.headers["authorization"] == d.headers["authorization"] == "Bearer t"


async def test_header_on_a_non_completion_path_is_stripped_and_proxied(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    decoder = await start_recorder()
    sidecar = await start_sidecar(decoder.url)
    async with http.get(sidecar.url + "/v1/models", headers={PREFILLER: "127.0.0.1:1"}) as r:
        assert r.status == 200
    assert [s.path for s in decoder.seen] == ["/v1/models"] and PREFILLER not in decoder.seen[0].headers


async def test_encoders_header_is_counted_logged_once_and_dropped_the_request_served_locally(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar, caplog: Any) -> None:
    """No encode leg here (docs/prefill-decode.md): an E/P/D pick is served with the media encoded on the
    decoder, counted and logged once, and the header goes no further."""
    decoder = await start_recorder()
    sidecar = await start_sidecar(decoder.url)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    with caplog.at_level("WARNING", logger="pd_sidecar"):
        for _ in range(2):
            status, _, _ = await post(http, sidecar, body, path="/v1/chat/completions",
                                      headers={ENCODERS: "10.0.3.0:8000,10.0.3.1:8000"})
            assert status == 200
    assert [d.body for d in decoder.seen] == [body, body]
    assert all(ENCODERS not in d.headers for d in decoder.seen)
    assert len(caplog.records) == 1 and ENCODERS in caplog.records[0].message
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_encode_leg_skipped_total") == 2


# ---- prefill failures degrade to a local prefill ------------------------------------------------

async def test_dead_prefill_endpoint_falls_back_to_local_prefill(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar, dead_port: DeadPort) -> None:
    decoder = await start_sim()
    sidecar = await start_sidecar(decoder.url)
    status, body, _ = await post(http, sidecar, {"prompt": tokens(1, 100), "max_tokens": 4},
                                 headers={PREFILLER: f"127.0.0.1:{dead_port()}"})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    d = await stats(http, decoder)
    assert (d["requests_total"], d["decode_legs_total"]) == (1, 0)
    text = await own_metrics(http, sidecar)
    assert sample(text, "pd_sidecar_prefill_fallback_total", 'reason="unreachable"') == 1
    assert sample(text, "pd_sidecar_prefill_retries_total") == 2
    assert sample(text, "pd_sidecar_requests_total", 'path="fallback"') == 1


async def test_fallback_logs_one_warning(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar, caplog: Any,
        dead_port: DeadPort) -> None:
    sidecar = await start_sidecar((await start_sim()).url, prefill_retries=0)
    with caplog.at_level("WARNING", logger="pd_sidecar"):
        await post(http, sidecar, {"prompt": "hi"}, headers={PREFILLER: f"127.0.0.1:{dead_port()}"})
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "unreachable" in caplog.records[0].message


async def test_a_kv_cache_source_header_is_counted_and_logged_once_not_dropped_silently(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar, caplog: Any) -> None:
    sidecar = await start_sidecar((await start_sim()).url)
    with caplog.at_level("WARNING", logger="pd_sidecar"):
        for _ in range(2):
            status, _, _ = await post(http, sidecar, {"prompt": "hi", "max_tokens": 1},
                                      headers={"x-kv-cache-source-host-port": "10.0.0.7:8000"})
            assert status == 200  # served by the decoder, which computes the prompt itself
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "P2P" in caplog.records[0].message
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_kv_cache_source_ignored_total") == 2


async def test_prefill_503_is_retried(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sim: StartSim,
        start_sidecar: StartSidecar) -> None:
    prefill = await start_recorder(statuses=[503, 502],
                                   answer={"choices": [], "kv_transfer_params": KV_FROM_FAKE_PREFILL})
    decoder = await start_sim()
    sidecar = await start_sidecar(decoder.url)
    status, _, _ = await post(http, sidecar, {"prompt": tokens(1, 50), "max_tokens": 2},
                              headers={PREFILLER: prefill.url.removeprefix("http://")})
    assert status == 200 and len(prefill.seen) == 3
    assert (await stats(http, decoder))["decode_legs_total"] == 1
    text = await own_metrics(http, sidecar)
    assert sample(text, "pd_sidecar_prefill_retries_total") == 2
    assert sample(text, "pd_sidecar_requests_total", 'path="disaggregated"') == 1


async def test_prefill_that_keeps_failing_or_refuses_falls_back(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sim: StartSim,
        start_sidecar: StartSidecar) -> None:
    busy = await start_recorder(statuses=[503] * 3)
    refusing = await start_recorder(statuses=[400])
    decoder = await start_sim()
    sidecar = await start_sidecar(decoder.url)
    for fake in (busy, refusing):
        status, _, _ = await post(http, sidecar, {"prompt": "hi"}, headers={PREFILLER: fake.url[7:]})
        assert status == 200
    assert (len(busy.seen), len(refusing.seen)) == (3, 1)  # 4xx is not retried
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_prefill_fallback_total", 'reason="error_status"') == 2


async def test_prefill_answer_without_kv_transfer_params_falls_back(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sim: StartSim,
        start_sidecar: StartSidecar) -> None:
    prefill = await start_recorder(answer={"choices": [], "kv_transfer_params": None})
    decoder = await start_sim()
    sidecar = await start_sidecar(decoder.url)
    status, _, _ = await post(http, sidecar, {"prompt": "hi"}, headers={PREFILLER: prefill.url[7:]})
    assert status == 200 and (await stats(http, decoder))["decode_legs_total"] == 0
    text = await own_metrics(http, sidecar)
    assert sample(text, "pd_sidecar_prefill_fallback_total", 'reason="no_kv_transfer_params"') == 1


async def test_slow_prefill_times_out_and_falls_back(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    slow = await start_sim(prefill_s_overhead=5.0, time_scale=1.0)
    decoder = await start_sim()
    sidecar = await start_sidecar(decoder.url, prefill_timeout_s=0.2)
    status, _, _ = await post(http, sidecar, {"prompt": "hi"}, headers={PREFILLER: host_port(slow)})
    assert status == 200
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_prefill_fallback_total", 'reason="timeout"') == 1


async def test_malformed_header_falls_back(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar((await start_sim()).url)
    status, _, _ = await post(http, sidecar, {"prompt": "hi"}, headers={PREFILLER: "not a host"})
    assert status == 200
    assert sample(await own_metrics(http, sidecar), "pd_sidecar_prefill_fallback_total", 'reason="bad_header"') == 1


async def test_invalid_json_with_header_is_a_400(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    decoder = await start_recorder()
    sidecar = await start_sidecar(decoder.url)
    for bad in (b"{not json", b"[1, 2]"):
        status, body, _ = await post(http, sidecar, bad, headers={PREFILLER: "127.0.0.1:1"})
        assert status == 400 and body["type"] == "BadRequestError"
    assert decoder.seen == []
    async with http.get(sidecar.url + "/health") as r:
        assert r.status == 200  # still serving


async def test_decoder_down_is_a_502(
        http: aiohttp.ClientSession, start_sidecar: StartSidecar, dead_port: DeadPort) -> None:
    sidecar = await start_sidecar(f"http://127.0.0.1:{dead_port()}")
    status, body, _ = await post(http, sidecar, {"prompt": "hi"})
    assert status == 502 and "unreachable" in body["message"]


# ---- cancellation ------------------------------------------------------------------------------

async def test_client_disconnect_aborts_the_decode_request(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    prefill, decoder = await start_sim(), await start_sim()
    sidecar = await start_sidecar(decoder.url)
    r = await http.post(sidecar.url + "/v1/completions", headers={PREFILLER: host_port(prefill)},
                        json={"prompt": tokens(1, 100), "max_tokens": 20000, "stream": True})
    await r.content.readline()
    assert (await stats(http, decoder))["running"] == 1
    r.close()
    for _ in range(200):
        if (s := await stats(http, decoder))["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert s["running"] == 0 and s["kv_cache_usage_perc"] == 0.0 and s["generation_tokens_total"] < 20000


# ---- the command line --------------------------------------------------------------------------

async def test_cli_serves_a_disaggregated_request(
        http: aiohttp.ClientSession, start_sim: StartSim, tmp_path: Any, dead_port: DeadPort) -> None:
    prefill, decoder = await start_sim(), await start_sim()
    port = dead_port()
    proc = subprocess.Popen([sys.executable, "-m", "pd_sidecar", "--port", str(port), "--decoder", decoder.url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                async with http.get(url + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        async with http.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2},
                             headers={PREFILLER: host_port(prefill)}) as r:
            assert r.status == 200
        assert (await stats(http, decoder))["decode_legs_total"] == 1
    finally:
        proc.terminate()
        proc.wait(10)


async def test_decoder_dying_mid_stream_cuts_the_client_off(
        http: aiohttp.ClientSession, start_sidecar: StartSidecar) -> None:
    async def half_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: {}\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", half_stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        sidecar = await start_sidecar(f"http://127.0.0.1:{runner.addresses[0][1]}")
        async with http.post(sidecar.url + "/v1/completions", json={"prompt": "hi", "stream": True}) as r:
            assert await r.content.readline() == b"data: {}\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    finally:
        await runner.cleanup()
