"""The scheduler model: an FCFS waiting queue, a running batch and a step loop, like vLLM's engine.

Pure asyncio, no HTTP. Each step admits what fits (a batch slot and KV blocks), sleeps for the
simulated step time (prefill of the newly admitted + one decode step of the whole batch) and
then gives every running request one token. A request's first token therefore arrives at the
end of the step that prefilled it, which is what makes TTFT grow with queueing and prompt length.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from vllm_sim.cache import Allocation, PrefixCache, block_hashes
from vllm_sim.config import SimConfig
from vllm_sim.tokens import FillerText


class RequestTooLarge(ValueError):
    """The request needs more KV blocks than the whole cache holds; it could never run."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One event on a request's output queue: a token, the last token, or a failure."""

    request: EngineRequest
    text: str = ""
    finished: bool = False
    error: EngineStopped | None = None


@dataclass(slots=True, eq=False)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    filler: FillerText
    # Shared by all prompts of one HTTP request so the handler waits on a single queue.
    output: asyncio.Queue[TokenOutput]
    index: int = 0  # choice index within its HTTP request
    state: RequestState = RequestState.WAITING
    arrival_time: float = 0.0
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generated: int = 0
    num_cached_tokens: int = 0
    allocation: Allocation | None = None
    block_hashes: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED)


class EngineObserver(Protocol):
    """Told about each request's milestones (times in loop seconds); metrics implement this."""

    def on_scheduled(self, request: EngineRequest, now: float) -> None: ...
    def on_token(self, request: EngineRequest, now: float, previous: float | None) -> None: ...
    def on_finished(self, request: EngineRequest, now: float) -> None: ...


@dataclass(slots=True)
class EngineStats:
    """Counters behind /sim/stats; unlike Prometheus counters these can be reset."""

    requests_total: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class Engine:
    def __init__(self, config: SimConfig, observer: EngineObserver | None = None) -> None:
        self.config = config
        self.cache = PrefixCache(config.num_gpu_blocks, config.block_size)
        self.stats = EngineStats()
        self._observer = observer
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[EngineRequest, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="vllm-sim-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # Unblock every handler still waiting on a request.
        for request in [*self._waiting, *self._running]:
            self._release(request, RequestState.ABORTED)
            request.output.put_nowait(TokenOutput(request, error=EngineStopped("engine stopped")))

    def submit(self, request: EngineRequest) -> None:
        total = len(request.prompt_token_ids) + request.max_tokens
        if self.cache.blocks_needed(total) > self.cache.num_blocks:
            raise RequestTooLarge(
                f"request needs {self.cache.blocks_needed(total)} KV blocks of {self.cache.block_size} "
                f"tokens but the cache has only {self.cache.num_blocks}"
            )
        request.block_hashes = block_hashes(request.prompt_token_ids, self.cache.block_size)
        request.arrival_time = asyncio.get_running_loop().time()
        request.state = RequestState.WAITING
        self.stats.requests_total += 1
        self._waiting.append(request)
        self._wake.set()

    def abort(self, request: EngineRequest) -> None:
        """Drop a request wherever it is (client went away); frees its slot and blocks."""
        if request.state is RequestState.WAITING:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass
        self._release(request, RequestState.ABORTED)

    def reset(self) -> None:
        self.cache.reset()
        self.stats = EngineStats()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            prefill_tokens, admitted = self._admit(loop.time())
            if not self._running:
                # Nothing runs and the head of the queue does not fit. submit() rejects requests
                # larger than the cache, so this should not happen; wait rather than spin.
                self._wake.clear()
                await self._wake.wait()
                continue
            duration = cfg.decode_s_base + cfg.decode_s_per_seq * len(self._running)
            if admitted:
                duration += cfg.prefill_s_overhead + cfg.prefill_s_per_token * prefill_tokens
            await asyncio.sleep(duration * cfg.time_scale)
            self._emit_tokens(loop.time())

    def _admit(self, now: float) -> tuple[int, int]:
        """FCFS: stop at the first request that does not fit, as vLLM's default policy does."""
        prefill_tokens = admitted = 0
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            total = len(request.prompt_token_ids) + request.max_tokens
            allocation = self.cache.allocate(request.prompt_token_ids, request.block_hashes, total)
            if allocation is None:
                break  # KV pressure: wait for running requests to free blocks
            self._waiting.popleft()
            request.allocation = allocation
            request.state = RequestState.RUNNING
            request.scheduled_time = now
            request.num_cached_tokens = allocation.hit_blocks * self.cache.block_size
            self._running[request] = None
            self.stats.prompt_tokens_total += len(request.prompt_token_ids)
            self.stats.cached_prompt_tokens_total += request.num_cached_tokens
            prefill_tokens += len(request.prompt_token_ids) - request.num_cached_tokens
            admitted += 1
            if self._observer is not None:
                self._observer.on_scheduled(request, now)
        return prefill_tokens, admitted

    def _emit_tokens(self, now: float) -> None:
        for request in list(self._running):
            previous = request.last_token_time
            request.num_generated += 1
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            self.stats.generation_tokens_total += 1
            finished = request.num_generated >= request.max_tokens
            if self._observer is not None:
                self._observer.on_token(request, now, previous)
            request.output.put_nowait(TokenOutput(request, request.filler.next_token(), finished))
            if finished:
                self._release(request, RequestState.FINISHED)
                if self._observer is not None:
                    self._observer.on_finished(request, now)

    def _release(self, request: EngineRequest, state: RequestState) -> None:
        if request.done:
            return
        self._running.pop(request, None)
        if request.allocation is not None:
            self.cache.free(request.allocation)
            request.allocation = None
        request.state = state
