"""Queueing, timing and KV pressure as a router sees them through HTTP and /metrics."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec

from tests.sim.conftest import StartSim, metric
from vllm_sim import SimServer


def tokens(tag: int, n: int) -> list[int]:
    """A token-id prompt of exactly n tokens that shares nothing with other tags."""
    return [tag * 10000 + i for i in range(n)]


async def complete(http: aiohttp.ClientSession, sim: SimServer, prompt: list[int], max_tokens: int) -> dict:
    async with http.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def scrape(http: aiohttp.ClientSession, sim: SimServer) -> str:
    async with http.get(sim.url + "/metrics") as r:
        return await r.text()


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict:
    async with http.get(sim.url + "/sim/stats") as r:
        return await r.json()


async def test_burst_beyond_max_num_seqs_waits_in_queue(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=2, time_scale=0.5)
    burst = [asyncio.create_task(complete(http, sim, tokens(i, 8), 20)) for i in range(8)]
    seen_waiting = seen_running = 0.0
    while not all(t.done() for t in burst):
        text = await scrape(http, sim)
        seen_waiting = max(seen_waiting, metric(text, "vllm:num_requests_waiting"))
        seen_running = max(seen_running, metric(text, "vllm:num_requests_running"))
        await asyncio.sleep(0.005)
    await asyncio.gather(*burst)
    assert seen_waiting > 0 and seen_running == 2
    text = await scrape(http, sim)
    assert metric(text, "vllm:num_requests_waiting") == 0 and metric(text, "vllm:request_success_total") == 8


async def test_ttft_grows_with_uncached_prompt_length(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(time_scale=0.25)  # gpu: 8000 tokens ~ 0.4 s of prefill, scaled to 0.1 s

    async def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        async with http.post(sim.url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 2, "stream": True}) as r:
            await r.content.readline()
            elapsed = time.perf_counter() - start
            await r.read()
        return elapsed

    short = await ttft(tokens(1, 16))
    long = await ttft(tokens(2, 8000))
    cached_long = await ttft(tokens(2, 8000))
    assert long > short + 0.05
    assert cached_long < long / 2


async def test_kv_usage_reports_blocks_held_by_running_requests(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(num_gpu_blocks=100, max_model_len=1600, time_scale=1.0)
    task = asyncio.create_task(complete(http, sim, tokens(1, 320), 200))  # 20 prompt + 13 output blocks
    usage = 0.0
    while usage == 0.0:
        usage = metric(await scrape(http, sim), "vllm:kv_cache_usage_perc")
        await asyncio.sleep(0.002)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert usage == 0.33


async def test_requests_wait_when_kv_cache_is_full(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    # Each request needs 40 of 50 blocks, so only one fits at a time although 4 batch slots are free.
    sim = await start_sim(num_gpu_blocks=50, max_num_seqs=4, max_model_len=800, time_scale=0.5)
    burst = [asyncio.create_task(complete(http, sim, tokens(i, 600), 40)) for i in range(3)]
    max_running = max_waiting = 0
    while not all(t.done() for t in burst):
        s = await stats(http, sim)
        max_running, max_waiting = max(max_running, s["running"]), max(max_waiting, s["waiting"])
        await asyncio.sleep(0.005)
    await asyncio.gather(*burst)
    assert max_running == 1 and max_waiting >= 1


async def test_least_recently_used_prefix_is_evicted_under_capacity(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    # 8 blocks of 16; each request holds 3 prompt blocks + 1 block for prompt tail and output.
    sim = await start_sim(num_gpu_blocks=8, max_model_len=128)
    a, b, c = tokens(1, 50), tokens(2, 50), tokens(3, 50)
    for prompt in (a, b, c):
        await complete(http, sim, prompt, 1)
    b_again = await complete(http, sim, b, 1)
    a_again = await complete(http, sim, a, 1)
    assert b_again["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    assert a_again["usage"]["prompt_tokens_details"]["cached_tokens"] < 48


async def test_client_disconnect_mid_stream_frees_slot_and_blocks(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(max_model_len=32768)
    body = msgspec.json.encode({"prompt": tokens(1, 100), "max_tokens": 20000, "stream": True})
    r = await http.post(sim.url + "/v1/completions", data=body)
    await r.content.readline()
    assert (await stats(http, sim))["running"] == 1
    r.close()  # drop the connection, as a client that gives up would
    for _ in range(200):
        s = await stats(http, sim)
        if s["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert s["running"] == 0 and s["waiting"] == 0
    assert s["kv_cache_usage_perc"] == 0.0
    assert s["generation_tokens_total"] < 20000


async def test_client_giving_up_on_a_non_streaming_request_aborts_it(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim()
    request = asyncio.create_task(complete(http, sim, tokens(1, 100), 20000))
    while (await stats(http, sim))["running"] == 0:
        await asyncio.sleep(0.005)
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    for _ in range(200):
        if (s := await stats(http, sim))["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert s["running"] == 0 and s["kv_cache_usage_perc"] == 0.0


async def test_metrics_slash_honours_the_name_filter_as_vllm_does(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    """As vLLM 0.32: `/metrics/?name[]=...` (prometheus_client's app) serves only those series (what the
    EPP's series filter asks for), saying what the whole page says; the exact `/metrics` ignores it."""
    from extproc.datalayer.scraper import parse_vllm_metrics

    sim = await start_sim()
    await complete(http, sim, tokens(1, 40), 2)
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
             "vllm:prefix_cache_queries_total", "vllm:cache_config_info"]  # fmt: skip
    async with http.get(sim.url + "/metrics/", params=[("name[]", n) for n in names]) as r:
        assert r.status == 200
        filtered = await r.text()
    whole = await scrape(http, sim)
    async with http.get(sim.url + "/metrics", params=[("name[]", n) for n in names]) as r:
        assert len(await r.text()) >= len(whole)  # the whole page
    served = {line.split("{")[0].split(" ")[0] for line in filtered.splitlines() if line and not line.startswith("#")}
    assert served == set(names)
    assert "vllm:e2e_request_latency_seconds" not in filtered and len(filtered) * 4 < len(whole)
    assert parse_vllm_metrics(filtered) == parse_vllm_metrics(whole)
