"""--control-port: /sim/* only on a separate loopback port, 404 on the main one; unset, nothing changes."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from tests.sim.conftest import StartSim, post
from vllm_sim import SimConfig, SimServer
from vllm_sim.cli import build_parser, config_from_args
from vllm_sim.config import ConfigError

CONTROL = [("GET", "/sim/stats"), ("POST", "/sim/reset"), ("POST", "/sim/fault")]


async def test_with_a_control_port_sim_endpoints_are_404_on_the_main_port(http: aiohttp.ClientSession,
                                                                          start_sim: StartSim) -> None:
    sim = await start_sim(control_port=0)
    for method, path in CONTROL:
        async with http.request(method, sim.url + path, json={"mode": "error"}) as r:
            assert r.status == 404, path
    assert sim.fault == "none"  # the POST /sim/fault above did nothing
    status, _, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 200


async def test_with_a_control_port_sim_endpoints_work_there_and_see_main_port_traffic(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(control_port=0)
    assert sim.control_port not in (0, sim.port)
    assert sim.control_url == f"http://127.0.0.1:{sim.control_port}"
    await post(http, sim, "/v1/completions", {"prompt": "abcdefgh", "max_tokens": 2}, {"x-request-id": "r1"})
    async with http.get(sim.control_url + "/sim/stats") as r:
        stats = await r.json()
    assert r.status == 200 and stats["requests_total"] == 1 and stats["request_ids"] == ["r1"]
    async with http.post(sim.control_url + "/sim/reset") as r:
        assert r.status == 200
    async with http.get(sim.control_url + "/sim/stats") as r:
        assert (await r.json())["requests_total"] == 0


async def test_fault_set_on_the_control_port_hits_the_main_port_only(http: aiohttp.ClientSession,
                                                                     start_sim: StartSim) -> None:
    sim = await start_sim(control_port=0)
    async with http.post(sim.control_url + "/sim/fault", json={"mode": "error"}) as r:
        assert r.status == 200
    status, _, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503
    async with http.get(sim.control_url + "/sim/stats") as r:
        assert r.status == 200
    async with http.post(sim.control_url + "/sim/fault", json={"mode": "none"}) as r:
        assert r.status == 200
    status, _, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 200


async def test_the_main_port_does_not_serve_the_control_port_paths_and_vice_versa(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(control_port=0)
    async with http.get(sim.control_url + "/metrics") as r:
        assert r.status == 404
    async with http.post(sim.control_url + "/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 404


async def test_control_port_binds_loopback_even_when_the_main_port_binds_all(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(host="0.0.0.0", control_port=0)
    assert sim.control_url.startswith("http://127.0.0.1:")
    async with http.get(sim.control_url + "/sim/stats") as r:
        assert r.status == 200
    async with http.get(f"http://127.0.0.1:{sim.port}/sim/stats") as r:
        assert r.status == 404


async def test_without_a_control_port_sim_endpoints_stay_on_the_main_port(http: aiohttp.ClientSession,
                                                                          start_sim: StartSim) -> None:
    sim = await start_sim()
    assert sim.control_port == sim.port and sim.control_url == sim.url
    async with http.get(sim.url + "/sim/stats") as r:
        assert r.status == 200


async def test_control_port_responses_say_who_served_them(http: aiohttp.ClientSession,
                                                          start_sim: StartSim) -> None:
    sim = await start_sim(control_port=0, name="pod-c")
    async with http.get(sim.control_url + "/sim/stats") as r:
        assert r.headers["x-served-by"] == "pod-c"


def test_cli_control_port_flag_defaults_to_the_main_port() -> None:
    assert config_from_args(build_parser().parse_args([])).control_port is None
    assert config_from_args(build_parser().parse_args(["--control-port", "9100"])).control_port == 9100


def test_cli_embedding_dim_flag() -> None:
    assert config_from_args(build_parser().parse_args([])).embedding_dim == 64
    assert config_from_args(build_parser().parse_args(["--embedding-dim", "8"])).embedding_dim == 8


@pytest.mark.parametrize(("overrides", "field"), [
    ({"port": 8000, "control_port": 8000}, "control_port"),
    ({"control_port": 70000}, "control_port"),
    ({"control_port": -1}, "control_port"),
    ({"embedding_dim": 0}, "embedding_dim"),
])
def test_bad_control_port_or_embedding_dim_is_a_config_error(overrides: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SimConfig.from_profile("gpu", **overrides)


async def test_a_control_port_in_use_fails_start_and_releases_the_main_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sim = SimServer(SimConfig.from_profile("gpu", port=0, control_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            await sim.start()
        main_port = sim.port
        await sim.stop()  # harmless after a failed start
    with socket.socket() as again:
        again.bind(("127.0.0.1", main_port))  # the main port was closed when start failed
