"""Fixtures for the Kubernetes tests: the API-server stand-in on a free loopback port, a kubeconfig
pointing at it, a real `kubernetes_asyncio` client built from that kubeconfig, and object builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from extproc.kubernetes.client import make_api_client
from tests.k8s.apiserver import FakeApiServer


@pytest.fixture
async def apiserver() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval=0.2)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        server.release()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> str:
    return apiserver.kubeconfig(str(tmp_path / "kubeconfig"))


@pytest.fixture
async def api(kubeconfig: str) -> AsyncIterator[ApiClient]:
    client = await make_api_client(kubeconfig)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def tasks() -> AsyncIterator[Callable[[Any], asyncio.Task[Any]]]:
    """Start coroutines as tasks that are cancelled and awaited when the test ends."""
    started: list[asyncio.Task[Any]] = []

    def start(coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        started.append(task)
        return task

    yield start
    for t in started:
        t.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    namespace: str = "default",
    hostname: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"app": "vllm"} if labels is None else labels}
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    spec: dict[str, Any] = {"containers": [{"name": "vllm", "image": "vllm"}]}
    if hostname is not None:  # as a StatefulSet or LeaderWorkerSet sets it: the pod's name
        spec["hostname"] = hostname
    return {"metadata": meta, "spec": spec, "status": status}


def pool(
    name: str = "pool", labels: dict[str, str] | None = None, ports: tuple[int, ...] = (8000,), namespace: str = "default"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "vllm"} if labels is None else labels},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
        },
    }
