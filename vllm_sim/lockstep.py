"""The step loop: one engine alone, or the ranks of a data-parallel group stepping in lockstep.

A data-parallel MoE group exchanges tokens between all its ranks in every MoE layer, so no rank
can start step k+1 before every rank has finished step k. One loop therefore drives all ranks:
each step, every rank admits its own work and prices its own batch; the group sleeps for the
slowest rank's cost plus the per-step all-to-all cost; then every rank emits its tokens. A rank
with nothing to run takes a dummy step (vLLM's dummy forward pass): it waits out the group's
step and produces nothing. When no rank has anything to run, the loop sleeps until woken.

A group of one is the plain engine loop: no all-to-all, the same timing as one vLLM engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from vllm_sim.engine import Engine


class LockstepGroup:
    """Drives engines' steps; `await start()`, `await stop()` always (stop fails what is unfinished)."""

    def __init__(self, engines: Sequence[Engine], time_scale: float, all2all_s: float = 0.0) -> None:
        if not engines:
            raise ValueError("a lockstep group needs at least one engine")
        self.engines = tuple(engines)
        self._time_scale = time_scale
        # Only ranks that exchange tokens pay for it: a group of one never does.
        self._all2all_s = all2all_s if len(self.engines) > 1 else 0.0
        # One wake event for the group: work arriving at any rank starts the next group step.
        self._wake = asyncio.Event()
        for engine in self.engines:
            engine.wake = self._wake
        self._task: asyncio.Task[None] | None = None
        self.steps = 0  # group steps taken (each one a dummy step for every rank with nothing to run)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vllm-sim-step-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for engine in self.engines:
            engine.close()

    def step_cost(self, costs: Sequence[float]) -> float:
        """Simulated seconds of one group step, given the costs of the ranks that have work."""
        return max(costs) + self._all2all_s

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            costs = [cost for engine in self.engines if (cost := engine.begin_step(now)) is not None]
            if not costs:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = now
            await asyncio.sleep(self.step_cost(costs) * self._time_scale)
            self.steps += 1
            now = loop.time()
            for engine in self.engines:
                engine.busy.add(started, now)  # every rank is busy for a group step, dummy steps included
                engine.end_step(now)
