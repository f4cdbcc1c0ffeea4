"""Fixtures: simulators, sidecars and recording fake servers on free loopback ports, always stopped."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from extproc.devstack.ports import ReservedPort, reserve_port
from pd_sidecar import Sidecar, SidecarConfig
from tests.conftest import StartSim  # noqa: F401 (the shared start_sim fixture lives there)
from vllm_sim import SimServer

StartSidecar = Callable[..., Awaitable[Sidecar]]
DeadPort = Callable[[], int]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """start_sidecar(decoder_url, **SidecarConfig overrides) -> a running Sidecar on a free port."""
    sidecars: list[Sidecar] = []

    async def start(decoder: str, **overrides: Any) -> Sidecar:
        overrides.setdefault("retry_backoff_s", 0.01)
        sidecar = Sidecar(SidecarConfig(decoder=decoder, port=0, **overrides))
        await sidecar.start()
        sidecars.append(sidecar)
        return sidecar

    yield start
    for sidecar in sidecars:
        await sidecar.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Recorder:
    """A fake model server: records every request, answers the queued statuses first, then `answer`."""

    answer: Any = field(default_factory=lambda: {"id": "x", "choices": []})
    statuses: deque[int] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = msgspec.json.decode(raw) if raw else None
        self.seen.append(Seen(request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body))
        if self.statuses:
            return web.json_response({"error": "busy"}, status=self.statuses.popleft())
        return web.json_response(self.answer)


StartRecorder = Callable[..., Awaitable[Recorder]]


@pytest.fixture
async def start_recorder() -> AsyncIterator[StartRecorder]:
    runners: list[web.AppRunner] = []

    async def start(**kwargs: Any) -> Recorder:
        if "statuses" in kwargs:
            kwargs["statuses"] = deque(kwargs["statuses"])
        recorder = Recorder(**kwargs)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        recorder.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return recorder

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def dead_port() -> Iterator[DeadPort]:
    """dead_port() -> a loopback port held for the test (extproc/devstack/ports.py) that nothing
    listens on: it refuses connections and no other socket can take it, yet a child can serve on it."""
    held: list[ReservedPort] = []

    def reserve() -> int:
        held.append(reserve_port())
        return held[-1].port

    yield reserve
    for reserved in held:
        reserved.close()


def sample(text: str, name: str, labels: str = "") -> float:
    """Value of sample `name{labels}` in a Prometheus text exposition (labels as written there)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{key} not in metrics")
