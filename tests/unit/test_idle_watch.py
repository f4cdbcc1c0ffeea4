"""BodyIdleWatch: one timer for every stream's request-body idle timeout (extproc.server.idle_watch)."""

from __future__ import annotations

import asyncio

import pytest

from extproc.server.idle_watch import BodyIdleWatch


async def _reader(watch: BodyIdleWatch, limit: float, wait: float) -> str:
    """A stream's read of its next body chunk that takes `wait` seconds, under a `limit`."""
    task = asyncio.current_task()
    assert task is not None
    watch.arm(task, limit)
    try:
        await asyncio.sleep(wait)
        return "chunk"
    except asyncio.CancelledError:
        if not watch.take_expired(task):
            raise
        task.uncancel()
        return "timed out"
    finally:
        watch.disarm(task)


async def test_a_stalled_read_is_cancelled_between_its_limit_and_an_eighth_later() -> None:
    watch = BodyIdleWatch()
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await _reader(watch, 0.2, 10.0) == "timed out"
    took = loop.time() - start
    assert 0.2 <= took < 0.2 + 0.2 / 8 + 0.1  # the last term: a loaded machine's scheduling delay
    assert watch.waiting == 0 and not watch.expired


async def test_reads_that_end_in_time_are_never_cancelled_and_the_timer_stops() -> None:
    watch = BodyIdleWatch()
    results = await asyncio.gather(*(_reader(watch, 0.3, 0.05 * i) for i in range(5)))
    assert results == ["chunk"] * 5
    await asyncio.sleep(0.1)  # the timer's last look finds nobody waiting and is not set again
    assert watch.waiting == 0 and watch._timer is None


async def test_only_the_late_stream_of_several_is_cancelled() -> None:
    watch = BodyIdleWatch()
    results = await asyncio.gather(_reader(watch, 0.15, 0.05), _reader(watch, 0.15, 5.0), _reader(watch, 0.15, 0.1))
    assert results == ["chunk", "timed out", "chunk"]


async def test_a_task_already_being_cancelled_is_left_to_that_cancellation() -> None:
    watch = BodyIdleWatch()
    task = asyncio.create_task(asyncio.sleep(5.0))
    await asyncio.sleep(0)
    watch.arm(task, 0.0)  # due now
    task.cancel()  # say flow control evicts it just as its deadline passes
    watch._look()
    assert not watch.expired  # not marked: the servicer sees an eviction, not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch.waiting == 0
