"""Fixtures shared by the test folders: in-process simulators on free loopback ports, always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

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
