"""The local stack's data-parallel groups (`epp up --dp-groups G --dp-size N`): one simulator per
group, its ranks stepping in lockstep, every rank its own endpoint with `rank` and `dpGroup`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from bench import faults
from extproc.cli.main import main
from extproc.datalayer.endpoints_file import load_endpoints_file
from tests.integration.conftest import MODEL, make_stack

GROUPS, SIZE = 2, 3


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def dp_stack(tmp_path_factory):
    with make_stack(tmp_path_factory.mktemp("dp-stack"), dp_groups=GROUPS, dp_size=SIZE, kv_events=True) as s:
        yield s


@pytest.mark.envoy
def test_every_rank_is_an_endpoint_with_its_rank_group_and_kv_port(dp_stack) -> None:
    assert dp_stack.endpoints_path is not None
    specs = load_endpoints_file(dp_stack.endpoints_path)
    assert [(s.name, s.rank, s.dp_group) for s in specs] == [
        (f"dp-{g}-rank-{r}", r, f"dp-{g}") for g in range(GROUPS) for r in range(SIZE)]
    assert dp_stack.dp_ranks == {f"dp-{g}": [("127.0.0.1", s.port) for s in specs[g * SIZE:(g + 1) * SIZE]]
                                 for g in range(GROUPS)}
    assert dp_stack.sim_ports == [s.port for s in specs]
    assert len({s.labels["llm-epp/kv-events-port"] for s in specs}) == GROUPS * SIZE
    for g in range(GROUPS):
        for r, (_, port) in enumerate(dp_stack.dp_ranks[f"dp-{g}"]):
            stats = get(f"http://127.0.0.1:{port}/sim/stats")
            assert stats["name"] == f"127.0.0.1:{port}" and stats["data_parallel_rank"] == r
    views = {e["address"]: e for e in get(f"http://127.0.0.1:{dp_stack.epp_admin_port}/debug/endpoints")["endpoints"]}
    assert {(v["rank"], v["dp_group"]) for v in views.values()} == {
        (r, f"dp-{g}") for g in range(GROUPS) for r in range(SIZE)}


@pytest.mark.envoy
def test_requests_through_envoy_are_served_by_the_ranks(dp_stack) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(
                http.post(f"{dp_stack.base_url}/completions",
                          json={"model": MODEL, "prompt": f"request {i} " * 20, "max_tokens": 30})
                for i in range(12)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    served = {r.headers["x-served-by"] for r in responses}
    ranks = {f"127.0.0.1:{p}" for p in dp_stack.sim_ports}
    assert served <= ranks and len(served) >= 3


@pytest.mark.envoy
def test_each_rank_publishes_kv_events_on_its_labelled_port_with_its_rank(dp_stack) -> None:
    import zmq

    spec = load_endpoints_file(dp_stack.endpoints_path)[SIZE + 2]  # dp-1, rank 2
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{spec.labels['llm-epp/kv-events-port']}")
    try:
        for attempt in range(20):  # until the SUB socket is connected and sees this request's blocks
            httpx.post(f"http://127.0.0.1:{spec.port}/v1/completions",
                       json={"prompt": f"attempt {attempt} " * 16, "max_tokens": 1}, timeout=10)
            try:
                _topic, _seq, payload = sub.recv_multipart(flags=zmq.NOBLOCK if attempt < 19 else 0)
                break
            except zmq.Again:
                time.sleep(0.1)
        _ts, events, dp_rank = msgspec.msgpack.decode(payload)
        assert dp_rank == 2 and events[0]["type"] == "BlockStored"
    finally:
        sub.close(linger=0)
        ctx.term()


class _DpUpRun(faults.UpRun):
    def __init__(self, workdir: Path, groups: int, size: int) -> None:
        super().__init__(workdir)
        self.argv = [sys.executable, "-m", "extproc.cli", "up", "--port", "0", "--workdir", str(workdir),
                     "--dp-groups", str(groups), "--dp-size", str(size), "--time-scale", "0.02", "--model", MODEL]


@pytest.mark.envoy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children found through /proc")
def test_epp_up_dp_groups_serves_every_rank_through_envoy(tmp_path: Path) -> None:
    with _DpUpRun(tmp_path, 2, 2) as up:
        assert "2 simulated data-parallel groups of 2 ranks" in up.output()
        entries = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())["endpoints"]
        assert [(e["rank"], e["dpGroup"]) for e in entries] == [(0, "dp-0"), (1, "dp-0"), (0, "dp-1"), (1, "dp-1")]
        r = httpx.post(f"http://127.0.0.1:{up.port}/v1/completions",
                       json={"model": MODEL, "prompt": "hello ranks", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by"] in {f"127.0.0.1:{e['port']}" for e in entries}
        assert len(up.children()) == 4  # two group simulators, the EPP, Envoy
        assert up.stop() == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--dp-size", "4"], "give --dp-groups too"),
    (["--dp-groups", "0"], "expected --dp-groups >= 1"),
    (["--dp-groups", "2", "--dp-size", "0"], "--dp-size >= 1"),
    (["--dp-groups", "2", "--endpoints", "x.yaml"], "cannot be combined with --sims or --endpoints"),
    (["--dp-groups", "2", "--sims", "3"], "cannot be combined with --sims"),
])
def test_bad_dp_group_flags_are_refused(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main(["up", "--workdir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
