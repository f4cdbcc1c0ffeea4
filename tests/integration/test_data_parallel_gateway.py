"""data-parallel-profile-handler end to end: real Envoy -> llm-epp -> the pod's primary port -> the rank.

Three simulators are the ranks 0-2 of one data-parallel group (an endpoints file with `rank` and
`dpGroup`). The config's primaryPort points at a stand-in for the sidecar a DP pod runs there: it
records what arrives (x-data-parallel-host-port, and the EPP's /debug/endpoints at that moment) and
forwards the request to the rank the header names. So each test sees that Envoy went to the primary
port, the header named the rank, the rank served, and the in-flight count sat on the rank endpoint.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
import yaml
from aiohttp import web

from extproc.devstack.stack import LocalStack, StackOptions
from tests.integration.conftest import FAST_SIM, MODEL
from tests.integration.test_gateway import log_for

pytestmark = pytest.mark.envoy

DP = "x-data-parallel-host-port"
RANKS = 3


class PrimaryPort:
    """An HTTP server on its own thread and loop: the sidecar on the pod's primary port."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []  # per request: its rank header, the EPP's endpoints then
        self.admin_url = ""  # the EPP's admin views, once the stack runs
        self.hold = 1  # requests held until this many have arrived (all in flight together)
        self._arrived = 0
        self._all_here: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the primary-port server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession()
        self._started.set()

    def expect(self, n: int) -> None:
        """Hold the next `n` requests until all `n` have arrived."""
        def reset() -> None:
            self.hold, self._arrived, self._all_here = n, 0, asyncio.Event()

        self._loop.call_soon_threadsafe(reset)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        rank = request.headers.get(DP)
        async with self._session.get(f"{self.admin_url}/debug/endpoints") as r:
            endpoints = (await r.json())["endpoints"]
        self.seen.append({"rank": rank, "endpoints": endpoints})
        if self._all_here is not None:
            self._arrived += 1
            if self._arrived >= self.hold:
                self._all_here.set()
            try:
                await asyncio.wait_for(self._all_here.wait(), 10)
            except TimeoutError:
                return web.Response(status=504, text="the other requests never came")
        if rank is None:
            return web.Response(status=400, text=f"no {DP}")  # as llm-d's sidecar refuses an unknown rank
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-request-id")}
        async with self._session.request(request.method, f"http://{rank}{request.path_qs}", data=body, headers=headers) as up:
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() in ("content-type", "x-served-by")}
            return web.Response(status=up.status, body=data, headers=out)

    def close(self) -> None:
        async def stop() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class RankStack(LocalStack):
    """The stack's simulators, listed as the ranks of one data-parallel group."""

    def start_sims(self) -> None:
        super().start_sims()
        assert self.endpoints_path is not None
        doc = yaml.safe_load(self.endpoints_path.read_text())
        for rank, entry in enumerate(doc["endpoints"]):
            entry.update(name=f"pod-rank-{rank}", rank=rank, dpGroup="dp-0")
        self.endpoints_path.write_text(yaml.safe_dump(doc))


def config(primary_port: int) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters:
    primaryPort: {primary_port}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""


@pytest.fixture(scope="module")
def primary() -> Iterator[PrimaryPort]:
    server = PrimaryPort()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, primary: PrimaryPort) -> Iterator[LocalStack]:
    tmp: Path = tmp_path_factory.mktemp("dp")
    (tmp / "dp.yaml").write_text(config(primary.port))
    opts = StackOptions(workdir=tmp, sims=RANKS, sim_args=FAST_SIM, model=MODEL, epp_args=("--config-file", str(tmp / "dp.yaml")))
    with RankStack(opts) as s:
        primary.admin_url = f"http://127.0.0.1:{s.epp_admin_port}"
        yield s


def rank_addresses(stack: LocalStack) -> set[str]:
    return {f"127.0.0.1:{p}" for p in stack.sim_ports}


def debug_endpoints(stack: LocalStack) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/endpoints", timeout=5) as r:
        return {e["address"]: e for e in json.load(r)["endpoints"]}


def complete(stack: LocalStack, request_id: str | None = None) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Say hello to the ranks", "max_tokens": 3}
    headers = {"x-request-id": request_id} if request_id else {}
    return httpx.post(f"{stack.base_url}/completions", json=body, headers=headers, timeout=30)


def test_envoy_goes_to_the_primary_port_and_the_rank_named_in_the_header_serves(stack, primary):
    primary.expect(1)
    before = len(primary.seen)
    r = complete(stack, "dp-1")
    assert r.status_code == 200, r.text
    seen = primary.seen[before:]
    assert len(seen) == 1 and seen[0]["rank"] in rank_addresses(stack)
    assert r.headers["x-served-by"] == seen[0]["rank"]  # the rank's simulator answered
    log = log_for(stack, "dp-1")
    assert log["destination"] == log["upstream"] == f"127.0.0.1:{primary.port}"


def test_the_rank_endpoint_carries_the_in_flight_count_while_the_request_runs(stack, primary):
    primary.expect(1)
    before = len(primary.seen)
    assert complete(stack).status_code == 200
    [seen] = primary.seen[before:]
    during = {e["address"]: e["in_flight"] for e in seen["endpoints"]}  # type: ignore[union-attr]
    assert during == {a: (1 if a == seen["rank"] else 0) for a in rank_addresses(stack)}
    views = debug_endpoints(stack)
    assert all(v["in_flight"] == 0 for v in views.values())  # settled when the response ended
    assert {(v["rank"], v["dp_group"]) for v in views.values()} == {(i, "dp-0") for i in range(RANKS)}


def test_concurrent_requests_spread_over_the_ranks_by_their_own_counts(stack, primary):
    """Held at the primary port until all three arrived, each request is in flight while the next is
    picked: counted on the rank, each pick sees the others busy and takes an idle rank."""
    primary.expect(RANKS)
    before = len(primary.seen)
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(complete(stack))

    threads = [threading.Thread(target=one) for _ in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * RANKS
    assert {s["rank"] for s in primary.seen[before:]} == rank_addresses(stack)
    assert {r.headers["x-served-by"] for r in results} == rank_addresses(stack)


def test_a_client_cannot_choose_the_rank(stack, primary):
    primary.expect(1)
    before = len(primary.seen)
    body = {"model": MODEL, "prompt": "Say hello", "max_tokens": 2}
    r = httpx.post(f"{stack.base_url}/completions", json=body, headers={DP: "10.9.9.9:1"}, timeout=30)
    assert r.status_code == 200
    assert primary.seen[before]["rank"] in rank_addresses(stack)
