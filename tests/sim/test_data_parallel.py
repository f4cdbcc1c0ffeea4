"""Data-parallel groups: ranks with their own caches and queues, stepping in lockstep."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import msgspec
import pytest

from tests.sim.conftest import metric
from vllm_sim.cli import build_parser, config_from_args, main
from vllm_sim.config import ConfigError, DataParallelConfig, SimConfig
from vllm_sim.data_parallel import DataParallelSim
from vllm_sim.engine import Engine, EngineRequest
from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.lockstep import LockstepGroup
from vllm_sim.server import SimServer
from vllm_sim.tokens import FillerText

StartGroup = Callable[..., Awaitable[DataParallelSim]]


def tokens(tag: int, n: int) -> list[int]:
    return [tag * 10000 + i for i in range(n)]


def dp_config(size: int = 2, lb: str = "external", start_rank: int = 0, **overrides: object) -> SimConfig:
    overrides.setdefault("time_scale", 0.1)
    return SimConfig.from_profile("gpu", port=0, data_parallel=DataParallelConfig(
        size=size, lb=lb, start_rank=start_rank, rank_ports=(0,) * size if lb == "external" else ()), **overrides)


@pytest.fixture
async def start_group() -> AsyncIterator[StartGroup]:
    groups: list[DataParallelSim | SimServer] = []

    async def start(size: int = 2, **overrides: object) -> DataParallelSim:
        group = DataParallelSim(dp_config(size, **overrides))
        groups.append(group)
        await group.start()
        return group

    yield start
    for group in groups:
        await group.stop()


@pytest.fixture
async def start_internal() -> AsyncIterator[Callable[..., Awaitable[SimServer]]]:
    servers: list[SimServer] = []

    async def start(size: int = 2, **overrides: object) -> SimServer:
        server = SimServer(dp_config(size, lb="internal", **overrides))
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


async def complete(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                   headers: dict[str, str] | None = None) -> tuple[dict, str]:
    async with http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens},
                         headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        return await r.json(), r.headers["x-served-by"]


async def get_json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as r:
        return await r.json()


def request(prompt: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest("r", prompt, max_tokens, FillerText(0, prompt), asyncio.Queue())


# ---- the step model, priced without a clock -------------------------------------------------

async def test_a_group_step_costs_its_slowest_rank_plus_the_all_to_all() -> None:
    config = dp_config(lb="internal", dp_all2all_s=0.003)
    busy, light = Engine(config), Engine(config)
    group = LockstepGroup([busy, light], config.time_scale, config.dp_all2all_s)
    busy.submit(request(tokens(1, 8000), 4))  # a long prefill
    light.submit(request(tokens(2, 16), 4))
    costs = [busy.begin_step(0.0), light.begin_step(0.0)]
    assert costs[0] == pytest.approx(0.008 + 0.0001 + 0.002 + 8000 / 20000)
    assert costs[1] == pytest.approx(0.008 + 0.0001 + 0.002 + 16 / 20000)
    assert group.step_cost([c for c in costs if c is not None]) == pytest.approx(costs[0] + 0.003)


async def test_an_idle_rank_takes_a_dummy_step_and_a_group_of_one_pays_no_all_to_all() -> None:
    config = dp_config(lb="internal")
    busy, idle = Engine(config), Engine(config)
    busy.submit(request(tokens(1, 16), 4))
    assert idle.begin_step(0.0) is None  # nothing to run: it only waits out the group's step
    assert LockstepGroup([busy, idle], 1.0, 0.5).step_cost([0.01]) == pytest.approx(0.51)
    assert LockstepGroup([Engine(config)], 1.0, 0.5).step_cost([0.01]) == pytest.approx(0.01)


# ---- through HTTP -----------------------------------------------------------------------------

async def test_a_long_prefill_on_rank_0_delays_rank_1s_tokens(start_group: StartGroup) -> None:
    group = await start_group(2, time_scale=0.1)  # 8000-token prefill: 0.4 s, scaled to 40 ms
    r0, r1 = group.urls
    async with aiohttp.ClientSession() as http:
        arrivals: list[float] = []

        async def stream_on_rank_1() -> None:
            async with http.post(r1 + "/v1/completions",
                                 json={"prompt": tokens(1, 16), "max_tokens": 400, "stream": True}) as r:
                async for _ in r.content:
                    arrivals.append(time.perf_counter())

        streaming = asyncio.create_task(stream_on_rank_1())
        while len(arrivals) < 20:  # rank 1 is decoding
            await asyncio.sleep(0.005)
        await complete(http, r0, tokens(2, 8000), 1)
        await streaming
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Rank 1 shares rank 0's prefill step: one of its gaps is at least that step (40 ms scaled).
    assert max(gaps) >= 0.8 * 0.1 * (8000 / 20000)


async def test_the_loop_sleeps_when_every_rank_is_idle(start_group: StartGroup) -> None:
    group = await start_group(2)
    async with aiohttp.ClientSession() as http:
        await complete(http, group.urls[1], tokens(1, 16), 5)
    steps = group.group.steps
    assert steps >= 5  # rank 0 took a dummy step in each of them
    await asyncio.sleep(0.05)
    assert group.group.steps == steps


async def test_each_rank_has_its_own_prefix_cache(start_group: StartGroup) -> None:
    group = await start_group(2)
    r0, r1 = group.urls
    prompt = tokens(7, 160)
    async with aiohttp.ClientSession() as http:
        await complete(http, r0, prompt, 1)
        again, _ = await complete(http, r0, prompt, 1)
        elsewhere, _ = await complete(http, r1, prompt, 1)
        s0, s1 = await get_json(http, r0 + "/sim/stats"), await get_json(http, r1 + "/sim/stats")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128
    assert elsewhere["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert (s0["requests_total"], s1["requests_total"]) == (2, 1)
    assert (s0["data_parallel_rank"], s1["data_parallel_rank"]) == (0, 1)


async def test_each_rank_port_serves_its_own_series_labelled_with_its_global_rank(start_group: StartGroup) -> None:
    group = await start_group(2, start_rank=4)
    async with aiohttp.ClientSession() as http:
        _, served_by = await complete(http, group.urls[1], tokens(1, 16), 3)
        texts = [await (await http.get(url + "/metrics")).text() for url in group.urls]
    assert served_by == group.servers[1].name == f"127.0.0.1:{group.ports[1]}"
    assert 'engine="4"' in texts[0] and 'engine="5"' not in texts[0]
    assert 'engine="5"' in texts[1] and 'engine="4"' not in texts[1]
    assert metric(texts[1], "vllm:generation_tokens_total") == 3
    assert metric(texts[0], "vllm:generation_tokens_total") == 0


async def test_each_rank_publishes_kv_events_on_its_own_port_with_its_global_rank(start_group: StartGroup) -> None:
    import zmq
    import zmq.asyncio

    group = await start_group(2, start_rank=2, block_size=4, kv_events=KVEventsConfig("tcp://*:0"))
    ctx = zmq.asyncio.Context()
    subs = []
    for server in group.servers:
        publisher = server.ranks[0].kv_events
        assert publisher is not None
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{publisher.port}")
        subs.append(sub)
    try:
        await asyncio.sleep(0.3)  # the SUB sockets connect
        async with aiohttp.ClientSession() as http:
            await complete(http, group.urls[1], tokens(1, 16), 1)
            await complete(http, group.urls[0], tokens(2, 16), 1)
        for sub, (rank, port) in zip(subs, ((2, group.ports[0]), (3, group.ports[1]))):
            topic, _seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
            ts, events, dp_rank = msgspec.msgpack.decode(payload)
            assert dp_rank == rank and topic == f"kv@127.0.0.1:{port}@sim-model".encode()
            assert events[0]["type"] == "BlockStored"
    finally:
        for sub in subs:
            sub.close(linger=0)
        ctx.term()


async def test_internal_lb_spreads_requests_over_the_ranks_as_vllm_scores_them(start_internal) -> None:
    sim = await start_internal(4, time_scale=1.0)
    async with aiohttp.ClientSession() as http:
        burst = [asyncio.create_task(complete(http, sim.url, tokens(i, 16), 50)) for i in range(8)]
        results = await asyncio.gather(*burst)
        stats = await get_json(http, sim.url + "/sim/stats")
        text = await (await http.get(sim.url + "/metrics")).text()
    assert {served_by for _, served_by in results} == {f"{sim.name}/dp{g}" for g in range(4)}
    assert [r["requests_total"] for r in stats["ranks"]] == [2, 2, 2, 2]
    assert stats["requests_total"] == 8
    assert all(f'engine="{g}"' in text for g in range(4))
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, four series


async def test_internal_lb_honours_vllms_rank_header_and_refuses_a_foreign_rank(start_internal) -> None:
    sim = await start_internal(2, start_rank=2)
    async with aiohttp.ClientSession() as http:
        _, served_by = await complete(http, sim.url, tokens(1, 16), 1, headers={"x-data-parallel-rank": "3"})
        async with http.post(sim.url + "/v1/completions", json={"prompt": tokens(1, 16), "max_tokens": 1},
                             headers={"x-data-parallel-rank": "0"}) as r:
            status, body = r.status, await r.json()
    assert served_by == f"{sim.name}/dp3"
    assert status == 400 and "x-data-parallel-rank" in body["message"]


# ---- flags and validation -----------------------------------------------------------------------

def parse(argv: list[str]) -> SimConfig:
    return config_from_args(build_parser().parse_args(argv))


def test_the_flags_describe_one_group_with_a_port_per_rank() -> None:
    config = parse(["--port", "9000", "--data-parallel-size", "4", "--data-parallel-size-local", "4",
                    "--data-parallel-start-rank", "8", "--data-parallel-external-lb", "--kv-events-port", "6000"])
    dp = config.data_parallel
    assert dp.api_ports(config.port) == [9000, 9001, 9002, 9003]
    assert config.kv_events is not None
    # vLLM offsets the KV-events port by the global DP rank (ZmqEventPublisher.offset_endpoint_port).
    assert dp.kv_endpoints(config.kv_events) == [f"tcp://*:{6000 + g}" for g in range(8, 12)]
    assert config.dp_all2all_s == 0.003
    config = parse(["--data-parallel-size", "2", "--data-parallel-external-lb", "--rank-ports", "7001,7005",
                    "--kv-events-ports", "7101,7102"])
    assert config.data_parallel.api_ports(config.port) == [7001, 7005]
    # A launcher may pass local rank 0's port as --port too.
    config = parse(["--port", "7001", "--data-parallel-size", "2", "--data-parallel-external-lb",
                    "--rank-ports", "7001,7005"])
    assert config.port == 7001 and config.data_parallel.api_ports(config.port) == [7001, 7005]


@pytest.mark.parametrize(("argv", "message"), [
    (["--data-parallel-size", "0"], "data_parallel_size: must be >= 1"),
    (["--data-parallel-size", "4", "--data-parallel-size-local", "2"], "group spanning processes is not simulated"),
    (["--data-parallel-size", "2", "--data-parallel-external-lb", "--rank-ports", "7001"], "one port per rank (2)"),
    (["--data-parallel-size", "2", "--rank-ports", "7001,7002"], "only with --data-parallel-external-lb"),
    (["--data-parallel-size", "2", "--data-parallel-external-lb", "--rank-ports", "7001,7001"],
     "port 7001 is also rank 0's API port"),
    (["--port", "7000", "--data-parallel-size", "2", "--data-parallel-external-lb", "--kv-events-port", "7001"],
     "rank 0's KV-events port: port 7001 is also rank 1's API port"),
    (["--port", "7000", "--data-parallel-size", "2", "--data-parallel-external-lb", "--rank-ports", "7001,7002"],
     "but --port says 7000"),
    (["--data-parallel-size", "2", "--kv-events-ports", "7101"], "one port per rank (2), got 1"),
    (["--data-parallel-size", "2", "--data-parallel-start-rank", "-1"], "data_parallel_start_rank: must be >= 0"),
    (["--data-parallel-size", "2", "--data-parallel-external-lb", "--control-port", "0"],
     "control_port: not with --data-parallel-external-lb"),
    (["--data-parallel-size", "2", "--dp-all2all-s", "-1"], "dp_all2all_s: must be >= 0"),
    (["--port", "65535", "--data-parallel-size", "2", "--data-parallel-external-lb"], "outside 1..65535"),
])
def test_bad_data_parallel_flags_are_refused_naming_the_flag(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(argv)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_plain_server_refuses_an_external_lb_group() -> None:
    with pytest.raises(ConfigError, match="DataParallelSim"):
        SimServer(dp_config(2, lb="external"))


async def test_the_launcher_command_line_serves_every_rank_on_its_port() -> None:
    """`python -m vllm_sim --port P0 --data-parallel-size N --data-parallel-external-lb --rank-ports P0,...`
    as a launcher (bench/, the local stack) runs it: each rank port answers for that rank."""
    import socket
    import subprocess
    import sys

    holders = [socket.socket() for _ in range(3)]
    for h in holders:
        h.bind(("127.0.0.1", 0))
    ports = [h.getsockname()[1] for h in holders]
    for h in holders:
        h.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_sim", "--host", "127.0.0.1", "--port", str(ports[0]), "--model", "m",
         "--data-parallel-size", "3", "--data-parallel-external-lb", "--rank-ports", ",".join(map(str, ports)),
         "--num-gpu-blocks", "500", "--time-scale", "0.05"],
        stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            for port in ports:
                for _ in range(200):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
            url = f"http://127.0.0.1:{ports[2]}"
            async with http.post(url + "/v1/completions",
                                 json={"model": "m", "prompt": "hello", "max_tokens": 3, "stream": True}) as r:
                assert r.status == 200 and r.headers["x-served-by"] == f"127.0.0.1:{ports[2]}"
                assert (await r.text()).endswith("data: [DONE]\n\n")
            stats = [await get_json(http, f"http://127.0.0.1:{p}/sim/stats") for p in ports]
            text = await (await http.get(url + "/metrics")).text()
            async with http.post(url + "/sim/reset") as r:
                assert r.status == 200
            after = await get_json(http, url + "/sim/stats")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert [s["requests_total"] for s in stats] == [0, 0, 1]
    assert all(s["running"] == 0 and s["waiting"] == 0 for s in stats)
    assert 'engine="2"' in text and 'num_gpu_blocks="500"' in text
    assert after["requests_total"] == 0
    assert proc.returncode == 0, err.decode()
