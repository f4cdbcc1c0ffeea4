"""Fixtures that start real simulators on free loopback ports and always stop them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import StartSim  # noqa: F401 (the shared start_sim fixture lives there)
from vllm_sim import SimServer


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


async def post(http: aiohttp.ClientSession, sim: SimServer, path: str, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """POST body (bytes as is, anything else as JSON); (status, JSON or SSE text, headers)."""
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    async with http.post(sim.url + path, data=data, headers=headers or {}) as r:
        if r.content_type == "text/event-stream":
            return r.status, await r.text(), r.headers
        return r.status, await r.json(content_type=None), r.headers
