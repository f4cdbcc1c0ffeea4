"""Flow control's policy plugins behave as llm-d documents them: fairness, ordering, usage limits,
saturation detectors, eviction and agent-identity (pickers/plugins/flowcontrol)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pickers.config.registry import build_plugin
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.flowcontrol import (
    DEFAULT_FLOW_ID,
    EvictionItem,
    FlowKey,
    FlowQueue,
    OrderingPolicy,
    PriorityBand,
    QueueItem,
    fairness_id_from_headers,
)
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import PluginContext
from pickers.plugins.flowcontrol.agent_identity import AgentIdentity
from pickers.plugins.flowcontrol.detectors import (
    ConcurrencyDetector,
    UtilizationDetector,
)
from pickers.plugins.flowcontrol.eviction import (
    PriorityThenTimeEvictionOrder,
    SheddableEvictionFilter,
)
from pickers.plugins.flowcontrol.fairness import (
    GlobalStrictFairness,
    RoundRobinFairness,
)
from pickers.plugins.flowcontrol.ordering import EdfOrdering, FcfsOrdering
from pickers.plugins.flowcontrol.program_aware import ProgramAwareFairness, jain_index
from pickers.plugins.flowcontrol.usage_limits import (
    PriorityHoldback,
    SoftReflectiveCeiling,
    StaticUsageLimit,
)


def request(rid: str = "r", headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest(request_id=rid, path="/v1/completions", headers=headers or {})


@dataclass
class Item:
    request_id: str
    flow: FlowKey
    enqueued_at: float
    ttl: float = 0.0
    byte_size: int = 10
    received_at: float = 0.0
    request: InferenceRequest = field(default_factory=request)


@dataclass
class Queue:
    flow: FlowKey
    ordering: OrderingPolicy
    items: list[Item] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def byte_size(self) -> int:
        return sum(i.byte_size for i in self.items)

    def head(self) -> Item | None:
        return min(self.items, key=lambda i: (self.ordering.key(i), i.enqueued_at), default=None)

    def pop(self) -> Item:
        item = self.head()
        assert item is not None
        self.items.remove(item)
        return item


@dataclass
class Band:
    priority: int
    ordering: OrderingPolicy
    policy_state: Any = None
    by_id: dict[str, Queue] = field(default_factory=dict)

    def add(self, flow_id: str, enqueued_at: float, ttl: float = 0.0, rid: str = "") -> Item:
        key = FlowKey(self.priority, flow_id)
        q = self.by_id.setdefault(flow_id, Queue(key, self.ordering))
        item = Item(rid or f"{flow_id}@{enqueued_at}", key, enqueued_at, ttl)
        q.items.append(item)
        return item

    def flows(self) -> Sequence[FlowKey]:
        return [q.flow for q in self.by_id.values()]

    def queue(self, flow_id: str) -> Queue | None:
        return self.by_id.get(flow_id)

    def queues(self) -> Iterator[Queue]:
        return iter(list(self.by_id.values()))


def test_the_fakes_meet_the_contracts():
    band = Band(0, FcfsOrdering())
    item = band.add("a", 1.0)
    assert isinstance(band, PriorityBand) and isinstance(band.by_id["a"], FlowQueue) and isinstance(item, QueueItem)


# -- ordering ------------------------------------------------------------------------------------


def test_fcfs_orders_by_enqueue_time():
    q = Queue(FlowKey(0, "a"), FcfsOrdering())
    for t in (3.0, 1.0, 2.0):
        q.items.append(Item(f"r{t}", q.flow, t))
    assert [q.pop().enqueued_at for _ in range(3)] == [1.0, 2.0, 3.0]


def test_edf_orders_by_deadline_then_enqueue_time_and_puts_no_ttl_last():
    edf = EdfOrdering()
    flow = FlowKey(0, "a")
    late_but_urgent = Item("u", flow, enqueued_at=5.0, ttl=1.0)  # deadline 6
    early_lax = Item("l", flow, enqueued_at=1.0, ttl=30.0)  # deadline 31
    no_ttl = Item("n", flow, enqueued_at=0.0, ttl=0.0)  # no deadline
    tie_a, tie_b = Item("a", flow, 2.0, 4.0), Item("b", flow, 3.0, 3.0)  # both deadline 6
    order = sorted([no_ttl, early_lax, late_but_urgent, tie_b, tie_a], key=edf.key)
    assert [i.request_id for i in order] == ["a", "b", "u", "l", "n"]
    assert edf.key(no_ttl)[0] == math.inf


# -- fairness ------------------------------------------------------------------------------------


def drain(policy: Any, band: Band, n: int) -> list[str]:
    out = []
    for _ in range(n):
        q = policy.pick(band)
        if q is None:
            break
        out.append(q.pop().request_id)
    return out


def test_global_strict_serves_the_band_as_one_queue_by_the_ordering_policy():
    band = Band(0, FcfsOrdering())
    for t in (1.0, 2.0, 3.0, 4.0):
        band.add("heavy", t, rid=f"h{t:g}")
    band.add("light", 2.5, rid="l2.5")
    policy = GlobalStrictFairness()
    band.policy_state = policy.new_state()
    assert drain(policy, band, 10) == ["h1", "h2", "l2.5", "h3", "h4"]


def test_global_strict_compares_heads_with_the_bands_ordering_policy():
    band = Band(0, EdfOrdering())
    band.add("a", 1.0, ttl=60.0, rid="a")  # deadline 61
    band.add("b", 5.0, ttl=2.0, rid="b")  # deadline 7
    assert GlobalStrictFairness().pick(band).flow.id == "b"


def test_global_strict_returns_none_for_an_empty_band():
    band = Band(0, FcfsOrdering())
    band.by_id["a"] = Queue(FlowKey(0, "a"), band.ordering)
    assert GlobalStrictFairness().pick(band) is None


def test_round_robin_cycles_flows_by_id_and_skips_empty_ones():
    band = Band(0, FcfsOrdering())
    for t in range(4):
        band.add("c-heavy", float(t), rid=f"c{t}")
    band.add("a", 10.0, rid="a0")
    band.add("b", 11.0, rid="b0")
    band.add("b", 12.0, rid="b1")
    policy = RoundRobinFairness()
    band.policy_state = policy.new_state()
    assert drain(policy, band, 10) == ["a0", "b0", "c0", "b1", "c1", "c2", "c3"]


def test_round_robin_goes_on_after_the_last_served_flow_when_it_is_gone():
    band = Band(0, FcfsOrdering())
    band.add("a", 1.0, rid="a0")
    band.add("b", 1.0, rid="b0")
    policy = RoundRobinFairness()
    band.policy_state = policy.new_state()
    assert policy.pick(band).flow.id == "a"
    del band.by_id["a"]
    band.add("c", 2.0, rid="c0")
    assert policy.pick(band).flow.id == "b"  # "a" left: the next id after it
    del band.by_id["b"]
    band.add("a", 3.0, rid="a1")
    assert policy.pick(band).flow.id == "c"  # "b" left: "c" is next, not the first flow ("a")


def test_round_robin_state_is_per_band():
    policy = RoundRobinFairness()
    one, two = Band(0, FcfsOrdering()), Band(1, FcfsOrdering())
    for band in (one, two):
        band.policy_state = policy.new_state()
        band.add("a", 1.0)
        band.add("b", 1.0)
    assert policy.pick(one).flow.id == "a"
    assert policy.pick(two).flow.id == "a"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_program_aware_prefers_the_program_with_the_least_attained_service():
    clock = Clock()
    policy = ProgramAwareFairness(clock=clock)
    hungry = request("x", {"x-llm-d-inference-fairness-id": "hungry"})
    policy.pre_request(hungry, CycleState(), SchedulingResult([]))
    policy.response_complete(hungry, None, 1000, 500)  # 1 x 1000 + 2 x 500
    band = Band(0, FcfsOrdering())
    band.add("hungry", clock.now - 5.0, rid="h")  # waited longer
    band.add("modest", clock.now - 1.0, rid="m")
    assert policy.programs["hungry"].service == 2000
    # modest: 0.8 x 1 + 0.2 x 0 = 0.8; hungry: 0.8 x 0 + 0.2 x 1 = 0.2
    assert policy.pick(band).flow.id == "modest"


def test_program_aware_breaks_equal_service_by_head_wait():
    clock = Clock()
    policy = ProgramAwareFairness(clock=clock)
    band = Band(0, FcfsOrdering())
    band.add("a", clock.now - 1.0)
    band.add("b", clock.now - 3.0)
    assert policy.pick(band).flow.id == "b"


def test_program_aware_service_halves_every_half_life():
    clock = Clock()
    policy = ProgramAwareFairness(half_life=60.0, clock=clock)
    r = request("x", {"x-llm-d-inference-fairness-id": "p"})
    policy.response_complete(r, None, 100, 0)
    clock.now += 120.0
    assert policy.attained(policy.programs["p"], clock.now) == pytest.approx(25.0)


def test_program_aware_records_the_queue_wait_its_pick_stamped():
    clock = Clock()
    policy = ProgramAwareFairness(clock=clock)
    band = Band(0, FcfsOrdering())
    item = band.add("p", clock.now - 0.25)
    item.request = request("x", {"x-llm-d-inference-fairness-id": "p"})
    assert policy.pick(band) is band.by_id["p"]
    policy.pre_request(item.request, CycleState(), SchedulingResult([]))
    m = policy.programs["p"]
    assert (m.dispatched, m.in_flight, m.waits, m.avg_wait_ms) == (1, 1, 1, 250)
    policy.response_complete(item.request, None, 10, 10)
    assert m.in_flight == 0 and m.service == 30


def test_program_aware_forgets_idle_programs_after_the_ttl():
    clock = Clock()
    policy = ProgramAwareFairness(eviction_ttl=100.0, eviction_sweep=10.0, clock=clock)
    policy.response_complete(request("x", {"x-llm-d-inference-fairness-id": "old"}), None, 1, 1)
    clock.now += 101.0
    policy.pick(Band(0, FcfsOrdering()))
    assert "old" not in policy.programs


def _served(policy: ProgramAwareFairness, pid: str, prompt: int, completion: int = 0, n: int = 1) -> None:
    for i in range(n):
        r = request(f"{pid}-{i}", {"x-llm-d-inference-fairness-id": pid})
        policy.pre_request(r, CycleState(), SchedulingResult([]))
        policy.response_complete(r, None, prompt, completion)


def test_las_decay_factor_decays_a_bands_idle_programs_once_a_pick():
    """llm-d 0.10's lasDecayFactor: with no half-life, every pick multiplies the service of the band's
    programs with nothing queued and nothing in flight; a queued program keeps its service."""
    clock = Clock()
    policy = ProgramAwareFairness(half_life=0.0, decay_factor=0.5, clock=clock)
    band = Band(0, FcfsOrdering())
    band.add("idle", clock.now)
    band.add("busy", clock.now)
    assert policy.pick(band) is not None  # both seen queued in band 0
    band.by_id["idle"].items.clear()
    _served(policy, "idle", 100)
    _served(policy, "busy", 100)
    clock.now += 3600.0  # wall time alone decays nothing
    policy.pick(band)
    policy.pick(band)
    assert policy.programs["idle"].service == pytest.approx(25.0)
    assert policy.programs["busy"].service == pytest.approx(100.0)
    policy.pick(Band(1, FcfsOrdering()))  # another band's pick leaves band 0's programs alone
    assert policy.programs["idle"].service == pytest.approx(25.0)


def test_las_decay_factor_loads_as_llm_d_0_10s_decay_with_a_warning():
    built = build_plugin("program-aware-fairness", "p", {"strategy": "las", "lasDecayFactor": 0.99997}, PluginContext())
    policy = built.plugin
    assert isinstance(policy, ProgramAwareFairness)
    assert (policy.decay_factor, policy.half_life) == (0.99997, 0.0) and built.parameters["lasHalfLifeSeconds"] == 0.0
    assert any("lasDecayFactor is llm-d 0.10's per-pick decay" in w for w in built.warnings)


def test_a_positive_half_life_overrides_las_decay_factor_as_in_llm_d():
    built = build_plugin("program-aware-fairness", "p", {"lasDecayFactor": 0.9, "lasHalfLifeSeconds": 30}, PluginContext())
    assert built.plugin.decay_factor is None and built.plugin.half_life == 30.0
    assert any("lasDecayFactor has no effect: a positive lasHalfLifeSeconds overrides it" in w for w in built.warnings)


@pytest.mark.parametrize("factor", [0, 1.5, -0.1])
def test_las_decay_factor_outside_0_1_is_refused(factor):
    with pytest.raises(ConfigError, match="lasDecayFactor"):
        build_plugin("program-aware-fairness", "p", {"lasDecayFactor": factor}, PluginContext())


def turn_policy(clock: Clock, **kw: float) -> ProgramAwareFairness:
    return ProgramAwareFairness(strategy="turn-priority", clock=clock, **kw)  # type: ignore[arg-type]


def test_turn_priority_prefers_the_deeper_session():
    clock = Clock()
    policy = turn_policy(clock, turn_time_weight=0.0)
    _served(policy, "shallow", 10, n=1)
    _served(policy, "deep", 10, n=20)
    band = Band(0, FcfsOrdering())
    band.add("shallow", clock.now - 5.0)
    band.add("deep", clock.now)
    assert policy.pick(band).flow.id == "deep"


def test_turn_priority_a_long_enough_wait_overcomes_depth():
    """score = turn + turnPriorityTimeWeight x head wait s: at the default 0.05 a turn-50 lead needs
    1,000 s of wait."""
    clock = Clock(now=10_000.0)
    policy = turn_policy(clock)
    _served(policy, "deep", 10, n=50)
    _served(policy, "starving", 10, n=1)
    band = Band(0, FcfsOrdering())
    band.add("deep", clock.now)
    band.add("starving", clock.now - 900.0)  # 2 + 45 < 51
    assert policy.pick(band).flow.id == "deep"
    band.by_id["starving"].items[0].enqueued_at = clock.now - 1800.0  # 2 + 90 > 51
    assert policy.pick(band).flow.id == "starving"


def test_turn_priority_an_idle_program_starts_again_from_turn_one():
    clock = Clock()
    policy = turn_policy(clock, turn_time_weight=0.0, turn_inactivity=60.0)
    _served(policy, "back", 10, n=30)
    _served(policy, "steady", 10, n=5)
    clock.now += 600.0  # "back" idle for 10 minutes; so is "steady", which then works again
    _served(policy, "steady", 10, n=1)
    band = Band(0, FcfsOrdering())
    band.add("back", clock.now)
    band.add("steady", clock.now)
    assert policy.turn_number(policy.programs["back"], clock.now) == 1
    assert policy.turn_number(policy.programs["steady"], clock.now) == 7
    assert policy.pick(band).flow.id == "steady"
    r = request("inflight", {"x-llm-d-inference-fairness-id": "back"})
    policy.pre_request(r, CycleState(), SchedulingResult([]))  # in flight: active whatever its last completion
    assert policy.turn_number(policy.programs["back"], clock.now) == 32


def test_turn_priority_with_inactivity_0_never_resets():
    clock = Clock()
    policy = turn_policy(clock, turn_inactivity=0.0)
    _served(policy, "p", 1, n=9)
    clock.now += 86400.0
    assert policy.turn_number(policy.programs["p"], clock.now) == 10


def test_turn_priority_loads_with_its_defaults_and_warns_of_las_parameters():
    built = build_plugin("program-aware-fairness", "p", {"strategy": "turn-priority", "lasWeightService": 0.5}, PluginContext())
    policy = built.plugin
    assert (policy.strategy, policy.turn_time_weight, policy.turn_inactivity) == ("turn-priority", 0.05, 120.0)
    assert built.parameters["turnPriorityTimeWeight"] == 0.05 and "lasHalfLifeSeconds" not in built.parameters
    assert any("lasWeightService has no effect with strategy turn-priority" in w for w in built.warnings)
    las = build_plugin("program-aware-fairness", "p", {"turnPriorityTimeWeight": 1.0}, PluginContext())
    assert any("turnPriorityTimeWeight has no effect with strategy las" in w for w in las.warnings)
    with pytest.raises(ConfigError, match="strategy"):
        build_plugin("program-aware-fairness", "p", {"strategy": "drr"}, PluginContext())


def test_jain_index():
    assert jain_index([]) == 1.0 and jain_index([5.0]) == 1.0
    assert jain_index([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0]) == pytest.approx(0.5)


# -- usage limits ----------------------------------------------------------------------------------


def test_static_usage_limit_gives_every_band_the_threshold():
    assert StaticUsageLimit(threshold=0.8).ceilings(0.5, [10, 0, -1]) == [0.8, 0.8, 0.8]


@pytest.mark.parametrize("params", [{"threshold": 0}, {"threshold": 1.5}])
def test_static_usage_limit_refuses_a_threshold_outside_0_1(params):
    with pytest.raises(ConfigError, match="threshold"):
        build_plugin("static-usage-limit-policy", "s", params, PluginContext())


def test_priority_holdback_by_rank_steps_evenly_from_max_to_min():
    p = PriorityHoldback("h", min_ceiling=0.4, max_ceiling=0.9)
    assert p.ceilings(0.0, [100, 50, 1]) == pytest.approx([0.9, 0.65, 0.4])
    assert p.ceilings(0.0, [7]) == [0.9]  # one band: no holdback


def test_priority_holdback_by_value_scales_with_the_priority_numbers():
    p = PriorityHoldback("h", min_ceiling=0.2, max_ceiling=1.0, domain="value")
    assert p.ceilings(0.0, [100, 90, 0]) == pytest.approx([1.0, 0.92, 0.2])
    assert p.ceilings(0.0, [5, 5]) == [1.0, 1.0]


@pytest.mark.parametrize(
    "params, fragment",
    [({}, "minCeiling: is required"), ({"minCeiling": 1.0}, "minCeiling"), ({"minCeiling": 0.5, "maxCeiling": 0.5}, "below maxCeiling"),
     ({"minCeiling": 0.1, "shape": "sigmoid"}, "shape"), ({"minCeiling": 0.1, "domain": "log"}, "domain")],
)  # fmt: skip
def test_priority_holdback_refuses_bad_parameters(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_plugin("priority-holdback-policy", "h", params, PluginContext())


def test_soft_reflective_ceiling_opens_bands_under_their_ceiling():
    p = SoftReflectiveCeiling()
    # 3 bands, s = 0.3: ceilings 1, 0.85, 0.7 -> all above s
    assert p.ceilings(0.3, [2, 1, 0]) == [1.0, 1.0, 1.0]
    assert p.tick == 0  # below the alternating regime the policy is a pure function


def test_soft_reflective_ceiling_alternates_gated_bands_one_call_in_a_period():
    p = SoftReflectiveCeiling()
    # s = 0.75 with 2 bands: band 1's ceiling is 0.25 <= s; period round(0.75 / 0.25) = 3
    calls = [p.ceilings(0.75, [1, 0]) for _ in range(6)]
    assert [c[1] for c in calls] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert all(c[0] == 1.0 for c in calls)


def test_soft_reflective_ceiling_shuts_lower_bands_at_saturation():
    assert SoftReflectiveCeiling().ceilings(1.2, [3, 2, 1]) == [1.0, 0.0, 0.0]
    assert SoftReflectiveCeiling().ceilings(0.9, [1]) == [1.0]


def test_soft_reflective_ceiling_takes_no_parameters():
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_plugin("soft-reflective-ceiling-policy", "s", {"threshold": 1}, PluginContext())


# -- saturation detectors --------------------------------------------------------------------------


def endpoint(i: int = 0, *, in_flight: int = 0, tokens: int = 0, waiting: int = 0, kv: float = 0.0, age: float = 0.0) -> Endpoint:
    m = Metrics(waiting=waiting, kv_usage=kv, updated_at=time.monotonic() - age if age is not None else 0.0)
    return Endpoint(EndpointSpec(f"e{i}", "10.0.0.1", 8000 + i), metrics=m, in_flight=in_flight, in_flight_prefill_tokens=tokens)


def test_concurrency_detector_requests_mode_is_aggregate_in_flight_over_capacity():
    d = ConcurrencyDetector(max_concurrency=10)
    assert d.saturation([endpoint(0, in_flight=5), endpoint(1, in_flight=10)]) == pytest.approx(0.75)
    assert d.saturation([]) == 1.0


def test_concurrency_detector_tokens_and_hybrid_modes():
    eps = [endpoint(0, in_flight=10, tokens=0), endpoint(1, in_flight=0, tokens=100)]
    assert ConcurrencyDetector(mode="tokens", max_token_concurrency=100).saturation(eps) == pytest.approx(0.5)
    # hybrid: per endpoint max(requests ratio, tokens ratio) = 1.0 and 1.0, averaged; aggregate would be 0.5
    hybrid = ConcurrencyDetector(mode="hybrid", max_concurrency=10, max_token_concurrency=100)
    assert hybrid.saturation(eps) == pytest.approx(1.0)


def test_concurrency_detector_filter_allows_the_headroom_burst():
    d = ConcurrencyDetector(max_concurrency=10, headroom=0.2)  # limit int(12.0) = 12
    eps = [endpoint(0, in_flight=11), endpoint(1, in_flight=12)]
    assert [e.name for e in d.filter(request(), CycleState(), eps)] == ["e0"]


def test_utilization_detector_is_the_average_of_each_endpoints_roofline():
    d = UtilizationDetector(queue_depth=5, kv_cache_util=0.8, staleness=10.0)
    eps = [endpoint(0, waiting=5, kv=0.4), endpoint(1, waiting=0, kv=0.4), endpoint(2, waiting=10, kv=0.0)]
    # max(1, 0.5) = 1, max(0, 0.5) = 0.5, max(2, 0) = 2 -> 3.5 / 3
    assert d.saturation(eps) == pytest.approx(3.5 / 3)
    assert d.saturation([]) == 1.0


def test_utilization_detector_scores_stale_endpoints_as_saturated():
    d = UtilizationDetector(staleness=0.2)
    eps = [endpoint(0, age=5.0), endpoint(1, age=0.0)]
    assert d.saturation(eps) == pytest.approx(0.5)
    assert d.stale_endpoints == 1


def test_utilization_detector_filter_drops_stale_and_full_endpoints_but_never_all():
    d = UtilizationDetector(queue_depth=5, kv_cache_util=0.8, staleness=1.0, headroom=0.2)  # limits 6 and 0.96
    eps = [endpoint(0, waiting=5, kv=0.9), endpoint(1, waiting=6), endpoint(2, kv=0.96), endpoint(3, age=5.0)]
    assert [e.name for e in d.filter(request(), CycleState(), eps)] == ["e0"]
    assert d.filter(request(), CycleState(), eps[1:]) == eps[1:]  # fail open


@pytest.mark.parametrize(
    "type_name, params, fragment",
    [("utilization-detector", {"kvCacheUtilThreshold": 1.5}, "kvCacheUtilThreshold"),
     ("utilization-detector", {"queueDepthThreshold": 0}, "queueDepthThreshold"),
     ("utilization-detector", {"metricsStalenessThreshold": "0s"}, "metricsStalenessThreshold"),
     ("utilization-detector", {"headroom": -1}, "headroom"),
     ("concurrency-detector", {"concurrencyMode": "bytes"}, "concurrencyMode"),
     ("concurrency-detector", {"maxConcurrency": 0}, "maxConcurrency")],
)  # fmt: skip
def test_detectors_refuse_bad_parameters(type_name, params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_plugin(type_name, "d", params, PluginContext())


def test_detector_defaults_are_llm_ds():
    u = build_plugin("utilization-detector", "u", None, PluginContext())
    assert dict(u.parameters) == {"kvCacheUtilThreshold": 0.8, "metricsStalenessThreshold": "200ms", "queueDepthThreshold": 5, "headroom": 0.0}
    c = build_plugin("concurrency-detector", "c", None, PluginContext())
    assert dict(c.parameters) == {"concurrencyMode": "requests", "maxConcurrency": 100, "maxTokenConcurrency": 1000000,
                                  "headroom": 0.0, "inFlightLoadProducerName": None}  # fmt: skip


# -- eviction ----------------------------------------------------------------------------------


def eviction(rid: str, priority: int, at: float) -> EvictionItem:
    return EvictionItem(rid, priority, at, "10.0.0.1:8000", request(rid))


def test_sheddable_filter_accepts_only_negative_priorities():
    f = SheddableEvictionFilter()
    assert [f.accept(eviction("r", p, 0.0)) for p in (-2, -1, 0, 5)] == [True, True, False, False]


def test_priority_then_time_evicts_the_lowest_priority_then_the_newest():
    order = PriorityThenTimeEvictionOrder()
    items = [eviction("old-1", -1, 1.0), eviction("new-1", -1, 9.0), eviction("old-5", -5, 1.0), eviction("zero", 0, 0.0)]
    assert [i.request_id for i in sorted(items, key=order.key)] == ["old-5", "new-1", "old-1", "zero"]


# -- agent identity / fairness id --------------------------------------------------------------------


def test_fairness_id_is_the_explicit_header_else_the_default_flow():
    assert fairness_id_from_headers(request(headers={"x-llm-d-inference-fairness-id": "t1"})) == "t1"
    assert fairness_id_from_headers(request(headers={"x-gateway-inference-fairness-id": "old"})) == "old"
    both = {"x-llm-d-inference-fairness-id": "new", "x-gateway-inference-fairness-id": "old"}
    assert fairness_id_from_headers(request(headers=both)) == "new"
    assert fairness_id_from_headers(request()) == DEFAULT_FLOW_ID


def test_agent_identity_uses_session_headers_after_the_explicit_one():
    agent = AgentIdentity("a", ("X-My-Agent",))
    assert agent.fairness_id(request(headers={"x-claude-code-session-id": "cc", "x-session-affinity": "oc"})) == "cc"
    assert agent.fairness_id(request(headers={"session-id": "new", "session_id": "old"})) == "new"
    assert agent.fairness_id(request(headers={"session_id": "old"})) == "old"
    assert agent.fairness_id(request(headers={"x-my-agent": "mine", "x-claude-code-session-id": "cc"})) == "mine"
    explicit = {"x-llm-d-inference-fairness-id": "tenant", "x-claude-code-session-id": "cc"}
    assert agent.fairness_id(request(headers=explicit)) == "tenant"
    assert agent.fairness_id(request(headers={"x-llm-d-inference-fairness-id": "", "session-id": "s"})) == "s"
    assert agent.fairness_id(request(headers={"x-unrelated": "v"})) == DEFAULT_FLOW_ID
