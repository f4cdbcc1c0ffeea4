"""Fixtures that start real simulators on free loopback ports and always stop them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from vllm_sim import SimConfig, SimServer

StartSim = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """start_sim(profile="gpu", **SimConfig overrides) -> a running SimServer on a free port.

    Time runs 10x faster than the profile unless a test says otherwise.
    """
    servers: list[SimServer] = []

    async def start(profile: str = "gpu", **overrides: object) -> SimServer:
        overrides.setdefault("time_scale", 0.1)
        server = SimServer(SimConfig.from_profile(profile, port=0, **overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def sim(start_sim: StartSim) -> SimServer:
    return await start_sim(models=("sim-model",))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def metric(text: str, name: str) -> float:
    """Value of the first sample called `name` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
