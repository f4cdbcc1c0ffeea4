"""Prefill/decode legs as vLLM's NixlConnector serves them: who prefilled, who pulled KV, and what it cost."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp

from tests.sim.conftest import StartSim, metric
from vllm_sim import SimServer

PREFILL_LEG = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}


def tokens(tag: int, n: int) -> list[int]:
    return [tag * 10000 + i for i in range(n)]


async def post(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any],
               path: str = "/v1/completions") -> tuple[int, Any]:
    async with http.post(sim.url + path, json=body) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text()
        return r.status, await r.json()


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    async with http.get(sim.url + "/sim/stats") as r:
        return await r.json()


async def prefill(http: aiohttp.ClientSession, sim: SimServer, prompt: list[int]) -> dict[str, Any]:
    status, body = await post(http, sim, {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": PREFILL_LEG})
    assert status == 200, body
    return body


async def timed_first_token(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    async with http.post(sim.url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        await r.content.readline()
        elapsed = time.perf_counter() - start
        await r.read()
    return elapsed


async def test_prefill_leg_returns_kv_transfer_params_like_nixl_connector(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(name="prefill-0")
    body = await prefill(http, sim, tokens(1, 100))
    params = body["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "prefill-0"
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", sim.port)
    assert len(params["remote_block_ids"]) == math.ceil(100 / 16)
    assert body["usage"]["completion_tokens"] == 1
    s = await stats(http, sim)
    assert (s["prefill_legs_total"], s["decode_legs_total"]) == (1, 0)


async def test_ordinary_response_has_no_kv_transfer_params(http: aiohttp.ClientSession, sim: SimServer) -> None:
    _, body = await post(http, sim, {"prompt": tokens(1, 10), "max_tokens": 2})
    assert "kv_transfer_params" not in body
    s = await stats(http, sim)
    assert (s["prefill_legs_total"], s["decode_legs_total"]) == (0, 0)


async def test_decode_leg_reports_whole_prompt_as_cached_and_counts_external_hits(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    p, d = await start_sim(), await start_sim()
    params = (await prefill(http, p, tokens(1, 100)))["kv_transfer_params"]
    status, body = await post(http, d, {"prompt": tokens(1, 100), "max_tokens": 5, "kv_transfer_params": params})
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 100 and body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 100
    s = await stats(http, d)
    assert (s["prefill_legs_total"], s["decode_legs_total"]) == (0, 1)
    assert s["kv_transfer_tokens_total"] == 100 and s["cached_prompt_tokens_total"] == 0
    async with http.get(d.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "vllm:prefix_cache_hits_total") == 0
    assert metric(text, "vllm:external_prefix_cache_hits_total") == 100


async def test_decode_leg_streams_with_usage(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    p, d = await start_sim(), await start_sim()
    params = (await prefill(http, p, tokens(1, 40)))["kv_transfer_params"]
    status, text = await post(http, d, {"prompt": tokens(1, 40), "max_tokens": 3, "stream": True,
                                        "stream_options": {"include_usage": True}, "kv_transfer_params": params})
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    assert '"cached_tokens":40' in text and '"completion_tokens":3' in text


async def test_decode_leg_skips_prefill_compute(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    # 8000 tokens: 0.8 s of prefill vs 8 ms of transfer, both scaled by 0.25.
    sim = await start_sim(prefill_s_per_token=1e-4, kv_transfer_s_per_token=1e-6, time_scale=0.25)
    params = {"do_remote_prefill": True, "remote_engine_id": "elsewhere", "remote_host": "10.0.0.1",
              "remote_port": 8000, "remote_block_ids": list(range(500))}
    local = await timed_first_token(http, sim, {"prompt": tokens(1, 8000), "max_tokens": 2})
    remote = await timed_first_token(http, sim, {"prompt": tokens(2, 8000), "max_tokens": 2,
                                                 "kv_transfer_params": params})
    assert local > 0.15 and remote < local / 4


async def test_decode_server_profile_sets_the_transfer_time(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    slow_link = await start_sim(prefill_s_per_token=0, kv_transfer_s_per_token=1e-4, time_scale=0.25)
    fast_link = await start_sim(prefill_s_per_token=0, kv_transfer_s_per_token=1e-7, time_scale=0.25)
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_host": "10.0.0.1", "remote_port": 8000}
    body = {"prompt": tokens(1, 4000), "max_tokens": 2, "kv_transfer_params": params}
    slow = await timed_first_token(http, slow_link, body)  # 0.4 s * 0.25
    fast = await timed_first_token(http, fast_link, body)
    assert slow > 0.09 and fast < slow / 2


async def test_mixed_pool_cpu_prefill_gpu_decode(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    cpu = await start_sim("cpu", name="cpu-prefill", time_scale=0.05)
    gpu = await start_sim("gpu", name="gpu-decode", time_scale=0.05)
    assert (cpu.config.kv_transfer_s_per_token, gpu.config.kv_transfer_s_per_token) == (1 / 50000, 1 / 200000)
    prompt = tokens(1, 1000)
    params = (await prefill(http, cpu, prompt))["kv_transfer_params"]
    assert params["remote_engine_id"] == "cpu-prefill"
    status, body = await post(http, gpu, {"prompt": prompt, "max_tokens": 4, "kv_transfer_params": params})
    assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000
    assert (await stats(http, cpu))["prefill_legs_total"] == 1
    assert (await stats(http, gpu))["decode_legs_total"] == 1


async def test_decode_leg_without_a_source_is_prefilled_locally(http: aiohttp.ClientSession, sim: SimServer) -> None:
    # NixlConnector does the same with incomplete params: warn and compute the prompt.
    status, body = await post(http, sim, {"prompt": tokens(1, 64), "max_tokens": 2,
                                          "kv_transfer_params": {"do_remote_prefill": True}})
    assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert (await stats(http, sim))["decode_legs_total"] == 0


async def test_contradictory_or_multi_prompt_kv_transfer_params_are_rejected(
        http: aiohttp.ClientSession, sim: SimServer) -> None:
    both = {**PREFILL_LEG, "do_remote_prefill": True}
    status, body = await post(http, sim, {"prompt": "hi", "kv_transfer_params": both})
    assert status == 400 and "cannot both be true" in body["message"]
    status, body = await post(http, sim, {"prompt": ["a", "b"], "kv_transfer_params": PREFILL_LEG})
    assert status == 400 and "exactly one prompt" in body["message"]


async def test_chat_prefill_leg_works_too(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, body = await post(http, sim, {"messages": [{"role": "user", "content": "hello " * 50}],
                                          "max_completion_tokens": 1, "kv_transfer_params": PREFILL_LEG},
                              path="/v1/chat/completions")
    assert status == 200 and body["kv_transfer_params"]["do_remote_prefill"] is True


async def test_decode_leg_waiting_for_kv_counts_as_waiting_and_abort_frees_it(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(kv_transfer_s_overhead=10.0, time_scale=1.0)
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_host": "10.0.0.1", "remote_port": 8000}
    task = asyncio.create_task(post(http, sim, {"prompt": tokens(1, 100), "max_tokens": 2,
                                                "kv_transfer_params": params}))
    while (s := await stats(http, sim))["waiting"] == 0:
        await asyncio.sleep(0.005)
    assert s["running"] == 0 and s["kv_cache_usage_perc"] > 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(200):
        if (s := await stats(http, sim))["waiting"] == 0:
            break
        await asyncio.sleep(0.01)
    assert s["waiting"] == 0 and s["running"] == 0 and s["kv_cache_usage_perc"] == 0.0
