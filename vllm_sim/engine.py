"""The scheduler model: an FCFS waiting queue and a running batch, stepped like vLLM's engine.

Pure asyncio, no HTTP. Each step admits what fits (a batch slot and KV blocks), sleeps for the
simulated step time (prefill of the newly admitted + one decode step of the whole batch) and
then gives every running request one token. The step loop lives in vllm_sim/lockstep.py: one
engine steps alone, the ranks of a data-parallel group step together. A request's first token therefore arrives at the
end of the step that prefilled it, which is what makes TTFT grow with queueing and prompt length.

A request with max_tokens=0 is prefill-only (an embedding, as vLLM runs a pooling request): it
is queued, cached and prefilled like any other and finishes at the end of its prefill step with
no token, its output a single finished event with empty text.

Prefill/decode disaggregation as vLLM's KV connectors do it: a prefill leg is an ordinary request
whose prompt blocks the caller will pull; a decode leg holds a slot and its blocks but, instead of
being prefilled, waits off the step loop for the KV transfer, then joins the batch.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from vllm_sim.cache import Allocation, PrefixCache, block_hashes
from vllm_sim.config import SimConfig
from vllm_sim.dcgm import BusyMeter
from vllm_sim.tokens import FillerText


class RequestTooLarge(ValueError):
    """The request needs more KV blocks than the whole cache holds; it could never run."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestState(enum.Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"  # a decode leg pulling its prompt's KV (vLLM: WAITING_FOR_REMOTE_KVS)
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class PdLeg(enum.Enum):
    """Which part of a disaggregated request this is, from its kv_transfer_params."""

    NONE = "none"  # aggregated: prefill and decode here
    PREFILL = "prefill"  # do_remote_decode: prefill here, someone else decodes
    DECODE = "decode"  # do_remote_prefill: prompt KV comes from a remote prefill


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
    max_tokens: int  # 0 = prefill only (pooling): finishes after its prefill step with no token
    filler: FillerText
    # Shared by all prompts of one HTTP request so the handler waits on a single queue.
    output: asyncio.Queue[TokenOutput]
    index: int = 0  # choice index within its HTTP request
    pd_leg: PdLeg = PdLeg.NONE
    state: RequestState = RequestState.WAITING
    arrival_time: float = 0.0
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generated: int = 0
    num_cached_tokens: int = 0  # local prefix hits plus, for a decode leg, the transferred tokens
    num_external_tokens: int = 0  # decode leg: prompt tokens whose KV came from the prefill server
    kv_block_ids: list[int] = field(default_factory=list)  # prefill leg: "block ids" to hand over
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
    prefill_legs_total: int = 0
    decode_legs_total: int = 0
    kv_transfer_tokens_total: int = 0  # prompt tokens decode legs pulled instead of computing


class Engine:
    def __init__(self, config: SimConfig, observer: EngineObserver | None = None) -> None:
        self.config = config
        self.cache = PrefixCache(config.num_gpu_blocks, config.block_size)
        self.stats = EngineStats()
        self._observer = observer
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[EngineRequest, None] = {}  # insertion-ordered set
        # Decode legs: pulling KV (each with the timer that ends its transfer), then ready to run.
        self._transferring: dict[EngineRequest, asyncio.TimerHandle] = {}
        self._ready: list[EngineRequest] = []
        self._next_block_id = 0
        # Set when there may be work (a submit, a finished KV transfer); the LockstepGroup that
        # drives this engine replaces it with the one event all its engines share.
        self.wake = asyncio.Event()
        self.busy = BusyMeter()  # the steps it took, for the DCGM stand-in's utilization (vllm_sim/dcgm.py)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Queued plus decode legs still waiting for their KV, as vLLM counts them."""
        return len(self._waiting) + len(self._transferring) + len(self._ready)

    @property
    def _slots_used(self) -> int:
        # A decode leg keeps its slot while it waits for KV (vLLM frees it; simpler and conservative).
        return len(self._running) + len(self._transferring) + len(self._ready)

    def close(self) -> None:
        """Fail every unfinished request (the engine stopped), unblocking the handlers waiting on them."""
        for request in [*self._waiting, *self._transferring, *self._ready, *self._running]:
            self.abort(request)
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
        if request.pd_leg is PdLeg.PREFILL:
            self.stats.prefill_legs_total += 1
        elif request.pd_leg is PdLeg.DECODE:
            self.stats.decode_legs_total += 1
        self._waiting.append(request)
        self.wake.set()

    def abort(self, request: EngineRequest) -> None:
        """Drop a request wherever it is (client went away); frees its slot and blocks."""
        if request.state is RequestState.WAITING:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass
        timer = self._transferring.pop(request, None)
        if timer is not None:
            timer.cancel()
        if request in self._ready:
            self._ready.remove(request)
        self._release(request, RequestState.ABORTED)

    def reset(self) -> None:
        self.cache.reset()
        self.stats = EngineStats()

    # ---- one step, in two halves; a LockstepGroup (vllm_sim/lockstep.py) sleeps in between ----

    def begin_step(self, now: float) -> float | None:
        """Admit what fits; this step's cost in simulated seconds, or None when nothing runs here
        (an idle rank of a busy data-parallel group then takes a dummy step: the group's time)."""
        # Decode legs whose KV arrived join here, so each still pays one full step for its token.
        for request in self._ready:
            request.state = RequestState.RUNNING
            self._running[request] = None
        self._ready.clear()
        if not self._waiting and not self._running:
            return None
        prefill_tokens, prefilled = self._admit(now)
        if not self._running:
            # Nothing runs: the admitted are all still pulling KV (their timers set wake), or the
            # head of the queue does not fit (submit() rejects requests larger than the cache).
            return None
        cfg = self.config
        cost = cfg.decode_s_base + cfg.decode_s_per_seq * len(self._running)
        if prefilled:
            cost += cfg.prefill_s_overhead + cfg.prefill_s_per_token * prefill_tokens
        return cost

    def end_step(self, now: float) -> None:
        """The step is over: every running request gets its token."""
        self._emit_tokens(now)

    def _admit(self, now: float) -> tuple[int, int]:
        """FCFS: stop at the first request that does not fit, as vLLM's default policy does."""
        prefill_tokens = prefilled = 0
        while self._waiting and self._slots_used < self.config.max_num_seqs:
            request = self._waiting[0]
            total = len(request.prompt_token_ids) + request.max_tokens
            allocation = self.cache.allocate(request.prompt_token_ids, request.block_hashes, total)
            if allocation is None:
                break  # KV pressure: wait for running requests to free blocks
            self._waiting.popleft()
            request.allocation = allocation
            request.state = RequestState.RUNNING
            request.scheduled_time = now
            local_hits = allocation.hit_blocks * self.cache.block_size
            num_prompt = len(request.prompt_token_ids)
            self.stats.prompt_tokens_total += num_prompt
            self.stats.cached_prompt_tokens_total += local_hits
            if request.pd_leg is PdLeg.DECODE:
                # Everything not cached here comes over the wire; nothing is prefilled locally.
                request.num_external_tokens = num_prompt - local_hits
                request.num_cached_tokens = num_prompt
                self.stats.kv_transfer_tokens_total += request.num_external_tokens
                self._start_transfer(request)
            else:
                request.num_cached_tokens = local_hits
                self._running[request] = None
                prefill_tokens += num_prompt - local_hits
                prefilled += 1
                if request.pd_leg is PdLeg.PREFILL:
                    request.kv_block_ids = self._block_ids(self.cache.blocks_needed(num_prompt))
            if self._observer is not None:
                self._observer.on_scheduled(request, now)
        return prefill_tokens, prefilled

    def _start_transfer(self, request: EngineRequest) -> None:
        cfg = self.config
        seconds = cfg.kv_transfer_s_overhead + cfg.kv_transfer_s_per_token * request.num_external_tokens
        request.state = RequestState.TRANSFERRING
        loop = asyncio.get_running_loop()
        self._transferring[request] = loop.call_later(seconds * cfg.time_scale, self._transfer_done, request)

    def _transfer_done(self, request: EngineRequest) -> None:
        if self._transferring.pop(request, None) is None:
            return  # aborted meanwhile
        self._ready.append(request)
        self.wake.set()

    def _block_ids(self, n: int) -> list[int]:
        """Stand-ins for the physical block ids a connector reports; only their count means anything."""
        first, self._next_block_id = self._next_block_id, (self._next_block_id + n) % self.cache.num_blocks
        return [(first + i) % self.cache.num_blocks for i in range(n)]

    def _emit_tokens(self, now: float) -> None:
        for request in list(self._running):
            if request.max_tokens == 0:
                request.output.put_nowait(TokenOutput(request, "", True))
                self._release(request, RequestState.FINISHED)
                if self._observer is not None:
                    self._observer.on_finished(request, now)
                continue
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
