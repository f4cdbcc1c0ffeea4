"""The supervisor: restarts failing tasks with exponential backoff and stops everything cleanly."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.datalayer.supervisor import Backoff, Supervisor


def test_backoff_doubles_from_a_tenth_of_a_second_to_ten() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    backoff.reset()
    assert backoff.next_delay() == 0.1


async def test_a_failing_task_is_restarted_with_growing_delays() -> None:
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(time.monotonic())
        if len(starts) < 4:
            raise RuntimeError("boom")

    sup = Supervisor(initial_backoff=0.02, max_backoff=1.0)
    task = sup.start("flaky", flaky)
    await asyncio.wait_for(task, 2.0)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 4 and sup.restarts("flaky") == 3
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
    assert sup.running == ()


async def test_failures_are_logged(caplog) -> None:
    calls = 0

    async def fails_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bad thing")

    sup = Supervisor(initial_backoff=0.001)
    await asyncio.wait_for(sup.start("once", fails_once), 1.0)
    assert any("task once failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_backoff_resets_after_a_long_healthy_run() -> None:
    starts: list[float] = []

    async def task() -> None:
        starts.append(time.monotonic())
        if len(starts) == 3:
            await asyncio.sleep(0.06)  # "healthy" for longer than reset_after
        if len(starts) < 5:
            raise RuntimeError("boom")

    sup = Supervisor(initial_backoff=0.05, max_backoff=10.0, reset_after=0.05)
    await asyncio.wait_for(sup.start("t", task), 3.0)
    # delays: 0.05, 0.1, then reset -> 0.05, 0.1
    gap_after_long_run = starts[3] - starts[2] - 0.06
    assert gap_after_long_run < 0.15  # without the reset it would be 0.2


async def test_a_clean_return_ends_the_task() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    sup = Supervisor()
    await sup.start("once", once)
    await asyncio.sleep(0.01)
    assert calls == 1 and sup.running == () and sup.restarts("once") == 0


async def test_stop_cancels_every_task_and_waits() -> None:
    cleaned: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(name)

    async def failing() -> None:
        raise RuntimeError("always")

    sup = Supervisor(initial_backoff=5.0)
    tasks = [sup.start("a", lambda: forever("a")), sup.start("b", lambda: forever("b")),
             sup.start("c", failing)]
    await asyncio.sleep(0.01)  # "c" is now sleeping in its backoff
    assert set(sup.running) == {"a", "b", "c"}
    await asyncio.wait_for(sup.stop(), 1.0)
    assert sorted(cleaned) == ["a", "b"]
    assert all(t.done() for t in tasks) and sup.running == ()


async def test_a_name_is_owned_once() -> None:
    sup = Supervisor()
    sup.start("x", lambda: asyncio.sleep(10))
    with pytest.raises(ValueError, match="already running"):
        sup.start("x", lambda: asyncio.sleep(10))
    await sup.stop()
    sup.start("x", lambda: asyncio.sleep(0))  # free again after stop
    await sup.stop()


async def test_a_factory_that_raises_is_restarted_too() -> None:
    calls = 0

    def factory():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls < 3:
            raise OSError("cannot even build the coroutine")
        return asyncio.sleep(0)

    sup = Supervisor(initial_backoff=0.001)
    await asyncio.wait_for(sup.start("f", factory), 1.0)
    assert calls == 3
