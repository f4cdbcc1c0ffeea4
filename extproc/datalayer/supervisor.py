"""Owner of the EPP's long-running tasks (discovery, metric scraping, event subscribers).

A task that raises is logged and restarted with exponential backoff; a task that returns is done;
`stop()` cancels everything and waits for it, so shutdown leaves nothing running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, object]]


class Backoff:
    """Delays `initial, 2*initial, 4*initial, ...` capped at `maximum`; `reset()` starts over."""

    __slots__ = ("initial", "maximum", "_next")

    def __init__(self, initial: float = 0.1, maximum: float = 10.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, delay * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Supervisor:
    """Starts named tasks and keeps them running until they return or `stop()` is called."""

    def __init__(
        self,
        *,
        initial_backoff: float = 0.1,
        max_backoff: float = 10.0,
        reset_after: float = 30.0,  # a run this long counts as healthy: the backoff starts over
    ) -> None:
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.reset_after = reset_after
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._restarts: dict[str, int] = {}

    def start(self, name: str, factory: TaskFactory) -> asyncio.Task[None]:
        """Run `await factory()` as task `name`, restarting it whenever it raises."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already running")
        task = asyncio.get_running_loop().create_task(self._keep_running(name, factory), name=name)
        self._tasks[name] = task
        self._restarts[name] = 0
        task.add_done_callback(lambda t: self._forget(name, t))
        return task

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]

    @property
    def running(self) -> tuple[str, ...]:
        """Names of the tasks still owned (running or waiting to restart)."""
        return tuple(self._tasks)

    def restarts(self, name: str) -> int:
        """How many times task `name` failed and was restarted (0 for an unknown name)."""
        return self._restarts.get(name, 0)

    async def _keep_running(self, name: str, factory: TaskFactory) -> None:
        backoff = Backoff(self.initial_backoff, self.max_backoff)
        while True:
            started = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                ran = time.monotonic() - started
                if ran > self.reset_after:
                    backoff.reset()
                delay = backoff.next_delay()
                log.exception("task %s failed after %.2fs; restarting in %.2fs", name, ran, delay)
                self._restarts[name] = self._restarts.get(name, 0) + 1
                await asyncio.sleep(delay)
            else:
                log.info("task %s finished", name)
                return

    async def stop(self) -> None:
        """Cancel every task and wait until all of them have ended."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
