"""program-aware-fairness (llm-d's): fairness between programs (flows, by fairness id), by one of two
`strategy`s.

`las` (default), Least Attained Service: a program's attained service is 1 x prompt tokens + 2 x
completion tokens of its finished requests, halved every `lasHalfLifeSeconds` of wall time (0: never;
decay is folded in whenever it is read or added to). `lasDecayFactor` is llm-d 0.10's per-pick decay
(removed after 0.10 for the half-life): given, and with no positive `lasHalfLifeSeconds`, each pick of a
band multiplies the service of that band's idle programs (nothing queued there, nothing in flight) by
it, as llm-d 0.10 does; a positive half-life overrides it, as there. Among the non-empty flows of a
band, each scores `lasWeightService x (1 - norm(service)) + lasWeightHeadWait x norm(head wait ms)`,
norm being min-max over those flows (0.5 when all are equal); the highest wins (ties: the first flow
seen).

`turn-priority` (llm-d after 0.10, PR #2116): each waiting flow scores `turnNumber +
turnPriorityTimeWeight x head wait seconds` and the highest wins (one waiting flow wins unscored),
turnNumber being the program's dispatched requests + 1, or 1 when it has nothing in flight and its last
completion is more than `turnPriorityInactivitySeconds` ago (0: never reset). It needs one fairness id
per session (llm-d's warning): unlabelled requests share one flow whose count is no session's depth.

It is also a pre-request and response-complete plugin: it counts dispatches, the queue wait (from the
enqueue time its pick stamped on the request) and the usage of each response. A program with nothing in
flight and no completion for `evictionTtlSeconds` (0: kept forever) is forgotten by a sweep at most
every `evictionSweepSeconds`, run from pick and response-complete calls rather than a background task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint
from pickers.framework.flowcontrol import (
    FlowQueue,
    PriorityBand,
    fairness_id_from_headers,
)
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext

INPUT_TOKEN_WEIGHT = 1
OUTPUT_TOKEN_WEIGHT = 2


@dataclass(slots=True)
class Program:
    last_completion: float  # time.monotonic(); seeded at creation so a program that never completes ages out
    service: float = 0.0  # attained service, decayed up to `anchor`
    anchor: float | None = None
    avg_wait_ms: float = 0.0
    waits: int = 0
    dispatched: int = 0
    in_flight: int = 0
    completed: float | None = None  # time.monotonic() of its last completion (turn-priority's inactivity)
    band: int | None = None  # the priority of the band its flow was last queued in (lasDecayFactor's idle decay)


LAS = "las"
TURN_PRIORITY = "turn-priority"
STRATEGIES = (LAS, TURN_PRIORITY)
_LAS_PARAMS = ("lasWeightService", "lasWeightHeadWait", "lasHalfLifeSeconds", "lasDecayFactor")
_TURN_PARAMS = ("turnPriorityTimeWeight", "turnPriorityInactivitySeconds")


class ProgramAwareFairness(Plugin):
    type = "program-aware-fairness"

    def __init__(
        self,
        name: str = "program-aware-fairness",
        *,
        strategy: str = LAS,
        weight_service: float = 0.8,
        weight_head_wait: float = 0.2,
        half_life: float = 60.0,
        decay_factor: float | None = None,
        turn_time_weight: float = 0.05,
        turn_inactivity: float = 120.0,
        eviction_ttl: float = 3600.0,
        eviction_sweep: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.weight_service = weight_service
        self.weight_head_wait = weight_head_wait
        self.half_life = half_life
        # lasDecayFactor (llm-d 0.10): per pick, for a band's idle programs; only without a positive half-life
        self.decay_factor = decay_factor if half_life <= 0 else None
        self.turn_time_weight = turn_time_weight
        self.turn_inactivity = turn_inactivity
        self.eviction_ttl = eviction_ttl
        self.eviction_sweep = eviction_sweep
        self.clock = clock
        self.programs: dict[str, Program] = {}
        self.last_sweep = clock()
        self.enqueue_key = ("enqueue-time", name)
        # the request's program: set by the config loader to flow control's resolver (agent-identity's when declared)
        self.fairness_id: Callable[[InferenceRequest], str] = fairness_id_from_headers

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ProgramAwareFairness:
        strategy = p.choice("strategy", LAS, STRATEGIES)
        chosen, other = (_LAS_PARAMS, _TURN_PARAMS) if strategy == LAS else (_TURN_PARAMS, _LAS_PARAMS)
        values: dict[str, float] = {}
        for key, default in (("lasWeightService", 0.8), ("lasWeightHeadWait", 0.2), ("lasHalfLifeSeconds", 60.0),
                             ("turnPriorityTimeWeight", 0.05), ("turnPriorityInactivitySeconds", 120.0)):  # fmt: skip
            if key in chosen or p.given(key):  # the other strategy's: checked and shown only when given
                values[key] = p.number(key, default, minimum=0.0)
        decay: float | None = None
        if p.given("lasDecayFactor"):
            decay = p.number("lasDecayFactor", 0.99997)
            if not 0.0 < decay <= 1.0:
                raise ParameterError("lasDecayFactor", f"must be in (0, 1], got {decay:g}")
            if strategy == LAS and values["lasHalfLifeSeconds"] > 0 and p.given("lasHalfLifeSeconds"):
                p.warnings.append("parameter lasDecayFactor has no effect: a positive lasHalfLifeSeconds overrides it "
                                  "(as in llm-d 0.10)")  # fmt: skip
                decay = None
            elif strategy == LAS:
                values["lasHalfLifeSeconds"] = p.effective["lasHalfLifeSeconds"] = 0.0  # llm-d 0.10's default
                p.warnings.append(f"parameter lasDecayFactor is llm-d 0.10's per-pick decay of idle programs, applied "
                                  f"as there ({decay:g} a pick, no wall-clock half-life); llm-d after 0.10 refuses it: "
                                  "use lasHalfLifeSeconds")  # fmt: skip
        for key in other:
            if p.given(key):
                p.warnings.append(f"parameter {key} has no effect with strategy {strategy} (llm-d reads only the "
                                  "chosen strategy's parameters)")  # fmt: skip
        values["evictionTtlSeconds"] = p.number("evictionTtlSeconds", 3600.0, minimum=0.0)
        sweep = p.number("evictionSweepSeconds", 300.0)
        if sweep <= 0:
            raise ParameterError("evictionSweepSeconds", f"expected a number > 0, got {sweep:g}")
        return cls(
            name,
            strategy=strategy,
            weight_service=values.get("lasWeightService", 0.8),
            weight_head_wait=values.get("lasWeightHeadWait", 0.2),
            half_life=values.get("lasHalfLifeSeconds", 60.0),
            decay_factor=decay if strategy == LAS else None,
            turn_time_weight=values.get("turnPriorityTimeWeight", 0.05),
            turn_inactivity=values.get("turnPriorityInactivitySeconds", 120.0),
            eviction_ttl=values["evictionTtlSeconds"],
            eviction_sweep=sweep,
        )

    # -- state -------------------------------------------------------------------------------------

    def program(self, pid: str, now: float) -> Program:
        m = self.programs.get(pid)
        if m is None:
            m = self.programs[pid] = Program(last_completion=now)
        return m

    def attained(self, m: Program, now: float) -> float:
        """The service with decay folded in up to `now` (and the anchor moved there)."""
        if m.anchor is None:
            m.anchor = now
        elif now > m.anchor:
            if self.half_life > 0:
                m.service *= math.exp2(-(now - m.anchor) / self.half_life)
            m.anchor = now
        return m.service

    def sweep(self, now: float) -> None:
        if self.eviction_ttl <= 0 or now - self.last_sweep < self.eviction_sweep:
            return
        self.last_sweep = now
        idle = [pid for pid, m in self.programs.items() if m.in_flight == 0 and now - m.last_completion > self.eviction_ttl]
        for pid in idle:
            del self.programs[pid]

    # -- fairness policy ---------------------------------------------------------------------------

    def new_state(self) -> None:
        return None

    def pick(self, band: PriorityBand) -> FlowQueue | None:
        now = self.clock()
        self.sweep(now)
        waiting: list[tuple[FlowQueue, Program, float]] = []  # (queue, its program, head wait in seconds)
        for queue in band.queues():
            head = queue.head()
            if head is None or len(queue) == 0:
                continue
            m = self.program(queue.flow.id, now)
            m.band = band.priority
            waiting.append((queue, m, max(0.0, now - head.enqueued_at)))
        if self.decay_factor is not None:
            self._decay_idle(band.priority, {id(m) for _, m, _ in waiting})
        if not waiting:
            return None
        best = self._pick_turn(waiting, now) if self.strategy == TURN_PRIORITY else self._pick_las(waiting, now)
        head = best.head()
        if head is not None:
            head.request.attributes[self.enqueue_key] = repr(head.enqueued_at)
        return best

    def _pick_las(self, waiting: list[tuple[FlowQueue, Program, float]], now: float) -> FlowQueue:
        entries = [(queue, self.attained(m, now), float(math.floor(wait * 1000))) for queue, m, wait in waiting]
        s_lo, s_hi = min(e[1] for e in entries), max(e[1] for e in entries)
        w_lo, w_hi = min(e[2] for e in entries), max(e[2] for e in entries)
        best, best_score = entries[0][0], -math.inf
        for queue, service, wait_ms in entries:
            score = self.weight_service * (1 - _norm(service, s_lo, s_hi)) + self.weight_head_wait * _norm(wait_ms, w_lo, w_hi)
            if score > best_score:
                best, best_score = queue, score
        return best

    def _pick_turn(self, waiting: list[tuple[FlowQueue, Program, float]], now: float) -> FlowQueue:
        if len(waiting) == 1:
            return waiting[0][0]
        best, best_score = waiting[0][0], -math.inf
        for queue, m, wait in waiting:
            score = self.turn_number(m, now) + self.turn_time_weight * wait
            if score > best_score:
                best, best_score = queue, score
        return best

    def turn_number(self, m: Program, now: float) -> int:
        """The turn of a program's waiting request: its dispatched requests + 1; 1 after
        `turnPriorityInactivitySeconds` with nothing in flight since its last completion."""
        if self.turn_inactivity > 0 and m.in_flight == 0 and m.completed is not None and now - m.completed > self.turn_inactivity:
            return 1
        return m.dispatched + 1

    def _decay_idle(self, priority: int, queued: set[int]) -> None:
        """lasDecayFactor (llm-d 0.10): this band's programs with nothing queued and nothing in flight
        lose that share of their service, once per pick."""
        assert self.decay_factor is not None
        for m in self.programs.values():
            if m.band == priority and id(m) not in queued and m.in_flight == 0:
                m.service *= self.decay_factor

    # -- request lifecycle -------------------------------------------------------------------------

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        now = self.clock()
        m = self.program(self.fairness_id(request), now)
        m.in_flight += 1
        m.dispatched += 1
        stamped = request.attributes.get(self.enqueue_key)
        if stamped is not None:
            wait_ms = math.floor(max(0.0, now - float(stamped)) * 1000)
            m.waits += 1
            m.avg_wait_ms += (wait_ms - m.avg_wait_ms) / m.waits

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        now = self.clock()
        m = self.program(self.fairness_id(request), now)
        cost = INPUT_TOKEN_WEIGHT * (prompt_tokens or 0) + OUTPUT_TOKEN_WEIGHT * (completion_tokens or 0)
        self.attained(m, now)
        m.service += cost
        m.in_flight = max(0, m.in_flight - 1)
        m.last_completion = m.completed = now
        self.sweep(now)

    def dump_state(self) -> dict[str, float]:
        """llm-d's DumpState: program count, requests in flight, Jain's index over average waits (no ids:
        they come from a client header)."""
        waits = [m.avg_wait_ms for m in self.programs.values() if m.waits > 0]
        return {
            "totalPrograms": len(self.programs),
            "totalInFlight": sum(m.in_flight for m in self.programs.values()),
            "fairnessIndex": jain_index(waits),
        }


def _norm(v: float, lo: float, hi: float) -> float:
    return 0.5 if hi == lo else (v - lo) / (hi - lo)


def jain_index(values: list[float]) -> float:
    """(sum x)^2 / (n sum x^2); 1.0 for fewer than two values or all zero."""
    n = len(values)
    sq = sum(x * x for x in values)
    if n <= 1 or sq == 0:
        return 1.0
    return sum(values) ** 2 / (n * sq)
