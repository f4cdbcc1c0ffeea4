"""The sidecar with data-parallel ranks: one port per rank in front of that rank's decoder, the
x-data-parallel-host-port header (llm-d's data-parallel routing), its 400s, per-rank metrics, the CLI."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.devstack.ports import PortUnavailable, ReservedPort, reserve_port
from pd_sidecar import Sidecar, SidecarConfig, legs, ranks
from tests.pd.conftest import DeadPort, StartRecorder, StartSidecar, StartSim, sample
from vllm_sim import SimConfig, SimServer

DP = "x-data-parallel-host-port"
PREFILLER = "x-prefiller-host-port"
ContiguousPorts = Callable[[int], list[int]]


@pytest.fixture
def contiguous_ports() -> Iterator[ContiguousPorts]:
    """contiguous_ports(n) -> n consecutive loopback ports, held for the test (ports.py) yet bindable."""
    held: list[ReservedPort] = []

    def take(n: int) -> list[int]:
        for _ in range(200):
            base = random.randrange(20000, 60000)
            got: list[ReservedPort] = []
            try:
                for p in range(base, base + n):
                    got.append(reserve_port(port=p))
            except PortUnavailable:
                for r in got:
                    r.close()
                continue
            held.extend(got)
            return [r.port for r in got]
        raise AssertionError(f"no {n} consecutive free ports")

    yield take
    for r in held:
        r.close()


@pytest.fixture
async def sims_on() -> AsyncIterator[Callable[..., Any]]:
    """sims_on(ports) -> simulators named decode-<r> on exactly these ports."""
    servers: list[SimServer] = []

    async def start(ports: list[int]) -> list[SimServer]:
        for r, port in enumerate(ports):
            server = SimServer(SimConfig.from_profile("gpu", port=port, time_scale=0.1, name=f"decode-{r}"))
            await server.start()
            servers.append(server)
        return servers[-len(ports):]

    yield start
    for server in servers:
        await server.stop()


async def post(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
               body: Any = None) -> tuple[int, Any, Any]:
    data = msgspec.json.encode(body if body is not None else {"prompt": "hello world", "max_tokens": 2})
    async with http.post(url + "/v1/completions", data=data, headers=headers or {}) as r:
        return r.status, await r.json(content_type=None), r.headers


async def served_by(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> str:
    status, _, headers_ = await post(http, url, headers)
    assert status == 200
    return headers_["x-served-by"]


async def decoders(start_sim: StartSim, n: int) -> list[SimServer]:
    return [await start_sim(name=f"decode-{r}") for r in range(n)]


async def dp_sidecar(start_sidecar: StartSidecar, sims: list[SimServer], **overrides: Any) -> Sidecar:
    """A sidecar with one rank per simulator, each on a free port (decoder_rank_ports: the sims' ports)."""
    return await start_sidecar(sims[0].url, data_parallel_size=len(sims),
                               decoder_rank_ports=tuple(s.port for s in sims), **overrides)


async def own_metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/sidecar/metrics") as r:
        return await r.text()


# ---- one port per rank ---------------------------------------------------------------------------

async def test_rank_r_listens_on_port_plus_r_in_front_of_decoder_port_plus_r(
        http: aiohttp.ClientSession, contiguous_ports: ContiguousPorts, sims_on: Any) -> None:
    decoder_ports, sidecar_ports = contiguous_ports(3), contiguous_ports(3)
    await sims_on(decoder_ports)
    config = SidecarConfig(decoder=f"http://127.0.0.1:{decoder_ports[0]}", port=sidecar_ports[0],
                           data_parallel_size=3)
    async with Sidecar(config) as sidecar:
        assert sidecar.ports == tuple(sidecar_ports)
        assert [await served_by(http, url) for url in sidecar.urls] == ["decode-0", "decode-1", "decode-2"]


async def test_explicit_rank_ports_and_decoder_rank_ports(
        http: aiohttp.ClientSession, start_sim: StartSim, dead_port: DeadPort) -> None:
    sims = await decoders(start_sim, 2)
    ports = (dead_port(), dead_port())
    config = SidecarConfig(decoder=sims[0].url, port=0, data_parallel_size=2, rank_ports=ports,
                           decoder_rank_ports=(sims[0].port, sims[1].port))
    async with Sidecar(config) as sidecar:
        assert sidecar.ports == ports
        assert [await served_by(http, url) for url in sidecar.urls] == ["decode-0", "decode-1"]


async def test_without_the_header_each_port_serves_its_own_rank(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sims = await decoders(start_sim, 3)
    sidecar = await dp_sidecar(start_sidecar, sims)
    assert len(set(sidecar.ports)) == 3
    assert await served_by(http, sidecar.urls[2]) == "decode-2"
    assert await served_by(http, sidecar.url) == "decode-0"  # the primary port is rank 0


# ---- x-data-parallel-host-port -------------------------------------------------------------------

async def test_header_on_the_primary_port_goes_to_the_rank_it_names(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sims = await decoders(start_sim, 3)
    sidecar = await dp_sidecar(start_sidecar, sims)
    assert await served_by(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.ports[2]}"}) == "decode-2"
    assert await served_by(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.ports[0]}"}) == "decode-0"
    primary, rank2 = await own_metrics(http, sidecar.url), await own_metrics(http, sidecar.urls[2])
    # counted where it arrived; the request itself on the rank that served it
    assert sample(primary, "pd_sidecar_data_parallel_header_total", 'outcome="routed"') == 2
    assert sample(primary, "pd_sidecar_requests_total", 'path="proxy"') == 1
    assert sample(rank2, "pd_sidecar_requests_total", 'path="proxy"') == 1
    assert sample(rank2, "pd_sidecar_data_parallel_header_total", 'outcome="routed"') == 0


async def test_header_never_reaches_the_decoder(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    recorders = [await start_recorder(), await start_recorder()]
    sidecar = await start_sidecar(recorders[0].url, data_parallel_size=2,
                                  decoder_rank_ports=tuple(int(r.url.rsplit(":", 1)[1]) for r in recorders))
    status, _, _ = await post(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.ports[1]}"})
    assert status == 200 and not recorders[0].seen
    assert [s.path for s in recorders[1].seen] == ["/v1/completions"] and DP not in recorders[1].seen[0].headers


async def test_header_routes_the_decode_leg_of_a_disaggregated_request(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    prefill = await start_sim(name="prefill-0")
    sims = await decoders(start_sim, 2)
    sidecar = await dp_sidecar(start_sidecar, sims)
    status, body, headers = await post(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.ports[1]}",
                                                           PREFILLER: f"127.0.0.1:{prefill.port}"})
    assert status == 200 and headers["x-served-by"] == "decode-1" and body["usage"]["completion_tokens"] == 2
    async with http.get(prefill.url + "/sim/stats") as r:
        assert (await r.json())["prefill_legs_total"] == 1
    async with http.get(sims[1].url + "/sim/stats") as r:
        assert (await r.json())["decode_legs_total"] == 1
    assert sample(await own_metrics(http, sidecar.urls[1]), "pd_sidecar_requests_total", 'path="disaggregated"') == 1


async def test_decode_leg_carries_the_prefill_ranks_kv_transfer_params_unchanged(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    # The prefill leg went to the prefill rank's own port, whose server answers with its own KV address
    # (NixlConnector: its side channel, already per rank); llm-d offsets no port on this path, nor do we.
    kv = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1],
          "remote_engine_id": "prefill-rank-3", "remote_host": "10.0.0.9", "remote_port": 5603}
    prefill = await start_recorder(answer={"choices": [], "kv_transfer_params": kv})
    decoders_ = [await start_recorder(), await start_recorder()]
    sidecar = await start_sidecar(decoders_[0].url, data_parallel_size=2,
                                  decoder_rank_ports=tuple(int(d.url.rsplit(":", 1)[1]) for d in decoders_))
    status, _, _ = await post(http, sidecar.urls[1], {PREFILLER: prefill.url.removeprefix("http://")})
    assert status == 200
    assert decoders_[1].seen[0].body["kv_transfer_params"] == kv
    assert prefill.seen[0].body["kv_transfer_params"] == legs.PREFILL_KV_TRANSFER_PARAMS


async def test_header_is_honoured_on_any_rank_port(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sims = await decoders(start_sim, 3)
    sidecar = await dp_sidecar(start_sidecar, sims)
    assert await served_by(http, sidecar.urls[2], {DP: f"127.0.0.1:{sidecar.ports[1]}"}) == "decode-1"


async def test_unknown_rank_port_is_a_400_that_lists_the_ranks(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar,
        dead_port: DeadPort) -> None:
    recorder = await start_recorder()
    sidecar = await start_sidecar(recorder.url, data_parallel_size=2,
                                  decoder_rank_ports=(int(recorder.url.rsplit(":", 1)[1]), dead_port()))
    other = dead_port()
    status, body, _ = await post(http, sidecar.url, {DP: f"127.0.0.1:{other}"})
    assert status == 400 and body["type"] == "BadRequestError" and body["code"] == 400
    assert f"127.0.0.1:{other} is not a rank of this sidecar" in body["message"]
    assert f"127.0.0.1:{sidecar.ports[0]}, 127.0.0.1:{sidecar.ports[1]}" in body["message"]
    assert not recorder.seen
    assert sample(await own_metrics(http, sidecar.url), "pd_sidecar_data_parallel_header_total",
                  'outcome="unknown_rank"') == 1


async def test_another_hosts_rank_port_is_a_400(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sims = await decoders(start_sim, 2)
    sidecar = await dp_sidecar(start_sidecar, sims)
    status, body, _ = await post(http, sidecar.url, {DP: f"10.9.9.9:{sidecar.ports[1]}"})
    assert status == 400 and "is not a rank of this sidecar" in body["message"]


async def test_pod_ip_is_the_address_the_header_must_name(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sims = await decoders(start_sim, 2)
    sidecar = await dp_sidecar(start_sidecar, sims, pod_ip="10.1.2.3")
    assert await served_by(http, sidecar.url, {DP: f"10.1.2.3:{sidecar.ports[1]}"}) == "decode-1"
    status, body, _ = await post(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.ports[1]}"})
    assert status == 400 and f"10.1.2.3:{sidecar.ports[0]}" in body["message"]


@pytest.mark.parametrize("value", ["", "nonsense", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x",
                                   "a:1,b:2", "[::1:80", "evil.com/x:80", "http://127.0.0.1:80"])
async def test_malformed_header_is_a_400_naming_the_header(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar,
        value: str) -> None:
    recorder = await start_recorder()
    sidecar = await start_sidecar(recorder.url)
    status, body, _ = await post(http, sidecar.url, {DP: value})
    assert status == 400 and body["message"].startswith(f"{DP}: ") and not recorder.seen
    assert sample(await own_metrics(http, sidecar.url), "pd_sidecar_data_parallel_header_total",
                  'outcome="bad_header"') == 1


async def test_header_twice_is_a_400(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    recorder = await start_recorder()
    sidecar = await start_sidecar(recorder.url)
    own = f"127.0.0.1:{sidecar.port}"
    async with http.post(sidecar.url + "/v1/completions", json={"prompt": "x"},
                         headers=[(DP, own), (DP, own)]) as r:
        assert r.status == 400 and "expected one host:port" in (await r.json())["message"]


async def test_without_data_parallel_the_header_may_name_only_this_port(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar((await start_sim(name="decode-0")).url)
    assert await served_by(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.port}"}) == "decode-0"
    status, _, _ = await post(http, sidecar.url, {DP: f"127.0.0.1:{sidecar.port + 1}"})
    assert status == 400


# ---- metrics per rank ------------------------------------------------------------------------------

async def test_metrics_on_a_rank_port_are_that_ranks_and_its_decoders(
        http: aiohttp.ClientSession, start_recorder: StartRecorder, start_sidecar: StartSidecar) -> None:
    recorders = [await start_recorder(answer={"decoder": r}) for r in range(2)]
    sidecar = await start_sidecar(recorders[0].url, data_parallel_size=2,
                                  decoder_rank_ports=tuple(int(r.url.rsplit(":", 1)[1]) for r in recorders))
    await post(http, sidecar.urls[1])
    texts = []
    for url in sidecar.urls:
        async with http.get(url + "/metrics") as r:
            texts.append(await r.text())
    assert '{"decoder": 0}' in texts[0] and '{"decoder": 1}' not in texts[0]
    assert '{"decoder": 1}' in texts[1]
    assert sample(texts[0], "pd_sidecar_requests_total", 'path="proxy"') == 0
    assert sample(texts[1], "pd_sidecar_requests_total", 'path="proxy"') == 1


async def test_a_dead_ranks_decoder_fails_only_that_ranks_metrics(
        http: aiohttp.ClientSession, start_sim: StartSim, start_sidecar: StartSidecar, dead_port: DeadPort) -> None:
    sim = await start_sim()
    sidecar = await start_sidecar(sim.url, data_parallel_size=2, decoder_rank_ports=(sim.port, dead_port()))
    async with http.get(sidecar.urls[0] + "/metrics") as r:
        assert r.status == 200
    async with http.get(sidecar.urls[1] + "/metrics") as r:
        assert r.status == 502
    status, body, _ = await post(http, sidecar.urls[1])
    assert status == 502 and f":{sidecar.config.decoder_rank_ports[1]}" in body["message"]


# ---- the layout on its own ---------------------------------------------------------------------------

def test_listen_ports() -> None:
    assert ranks.listen_ports(8000, 3, ()) == (8000, 8001, 8002)
    assert ranks.listen_ports(0, 2, ()) == (0, 0)
    assert ranks.listen_ports(0, 2, (9001, 9005)) == (9001, 9005)


def test_decoder_urls() -> None:
    assert ranks.decoder_urls("http://127.0.0.1:8200/", 1, ()) == ("http://127.0.0.1:8200",)
    assert ranks.decoder_urls("http://h:8200", 3, ()) == ("http://h:8200", "http://h:8201", "http://h:8202")
    assert ranks.decoder_urls("https://h:8200/base", 2, ()) == ("https://h:8200/base", "https://h:8201/base")
    assert ranks.decoder_urls("http://h", 2, (7000, 7100)) == ("http://h:7000", "http://h:7100")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data_parallel_size": 0}, "data_parallel_size: must be >= 1"),
    ({"data_parallel_size": 2, "rank_ports": (9000,)}, "rank_ports: 1 ports for data_parallel_size 2"),
    ({"data_parallel_size": 2, "rank_ports": (9000, 9000)}, "rank_ports: ports repeat"),
    ({"data_parallel_size": 2, "rank_ports": (9000, 0)}, "rank_ports: port 0 is not in 1..65535"),
    ({"data_parallel_size": 2, "port": 8000, "rank_ports": (9000, 9001)}, "port: 8000 disagrees with rank_ports"),
    ({"data_parallel_size": 2, "port": 65535}, "port: ranks on 65535..65536 pass 65535"),
    ({"data_parallel_size": 2, "decoder": "http://h"}, "decoder: 'http://h' has no port"),
    ({"data_parallel_size": 2, "decoder": "http://h:65535"}, "decoder: decoder ranks on 65535..65536"),
    ({"data_parallel_size": 2, "decoder_rank_ports": (1,)}, "decoder_rank_ports: 1 ports"),
    ({"data_parallel_size": 2, "decoder_rank_ports": (7000, 7001)}, "decoder: port 8200 disagrees with"),
    ({"pod_ip": "not an address"}, "pod_ip: expected this pod's IP address or host name"),
])
def test_config_refuses_a_bad_layout_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"decoder": "http://127.0.0.1:8200", "port": 0, **overrides}
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        SidecarConfig(**fields).validate()


def test_rank_table_matches_the_pod_address_in_any_spelling() -> None:
    table = ranks.RankTable(ranks.pod_address("", "::1"), {8000: 0, 8001: 1})
    assert table.rank_of(["[0:0::1]:8001"]) == 1
    with pytest.raises(ranks.UnknownRank):
        table.rank_of(["[::2]:8001"])
    assert ranks.RankTable(ranks.pod_address("Pod-A.NS", "0.0.0.0"), {8000: 0}).rank_of(["pod-a.ns:8000"]) == 0


def test_rank_table_without_a_pod_address_checks_the_port_only() -> None:
    table = ranks.RankTable(ranks.pod_address("", "0.0.0.0"), {8000: 0, 8001: 1})
    assert table.address == "" and table.rank_of(["10.0.0.7:8001"]) == 1
    with pytest.raises(ranks.UnknownRank, match=r"its ranks: \*:8000, \*:8001"):
        table.rank_of(["10.0.0.7:8002"])


@given(st.lists(st.text(), min_size=1, max_size=3))
def test_header_parsing_fails_only_with_its_own_error(values: list[str]) -> None:
    table = ranks.RankTable("127.0.0.1", {8000: 0})
    try:
        assert table.rank_of(values) == 0
    except (legs.BadDataParallelHeader, ranks.UnknownRank):
        pass


# ---- the command line ------------------------------------------------------------------------------

async def test_cli_serves_every_rank_and_routes_by_the_header(
        http: aiohttp.ClientSession, start_sim: StartSim, dead_port: DeadPort) -> None:
    sims = await decoders(start_sim, 2)
    ports = [dead_port(), dead_port()]
    argv = [sys.executable, "-m", "pd_sidecar", "--decoder", sims[0].url, "--data-parallel-size", "2",
            "--rank-ports", ",".join(map(str, ports)), "--decoder-rank-ports", f"{sims[0].port},{sims[1].port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "POD_IP": "127.0.0.1"})
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            for _ in range(200):
                try:
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        assert await served_by(http, urls[1]) == "decode-1"
        assert await served_by(http, urls[0], {DP: f"127.0.0.1:{ports[1]}"}) == "decode-1"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(("args", "message"), [
    (["--data-parallel-size", "2", "--rank-ports", "9000"], "rank_ports: 1 ports for data_parallel_size 2"),
    (["--data-parallel-size", "2", "--port", "9000", "--rank-ports", "9100,9101"], "port: 9000 disagrees"),
    (["--rank-ports", "9000,x"], "expected comma-separated port numbers, got '9000,x'"),
    (["--data-parallel-size", "2", "--pod-ip", "a b"], "pod_ip: expected"),
])
def test_cli_refuses_a_bad_layout(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pd_sidecar", "--decoder", "http://127.0.0.1:8200", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
