"""GIE's SLO-aware scorers that came before llm-d's decomposed latency plugins, on the online model:
predicted-latency-scorer (GIE v1.x, deprecated) and the slo-prediction-experimental branch's
slo-request-tracker, slo-scorer and slo-aware-profile-handler: the one endpoint each chooses, their
tiers, gates and weights, their admission, their config errors and warnings, and configs in the
shapes of llm-d's latency guides (tests/unit/configs/gie-*.yaml, ours) loading and serving."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from extproc.cli import main as cli
from pickers.config.loader import EndpointPickerConfig, load_config, load_config_file
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel, LatencyPrior, LatencySettings
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.legacy_scorer import PredictedLatencyScorer
from pickers.plugins.latency.producer import LatencyPrediction
from pickers.plugins.latency.selection import Candidate, composite_weights, draw, negative_choices, positive_weights
from pickers.plugins.latency.slo_branch import SloRequestTracker, SloScorer
from pickers.plugins.scorer.affinity.prefix import prefix_match

CONFIGS = Path(__file__).parent / "configs"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
# 10,000 tokens/s, 10 ms; TPOT 20 ms + 1 ms per running request
PRIOR = LatencyPrior(prefill_tokens_per_s=10_000, ttft_overhead_s=0.010, ttft_per_running_s=0.0, tpot_base_s=0.020, tpot_per_running_s=0.001)
PROMPT = "".join(f"{i:04d}" for i in range(1000))  # 1,000 tokens: 110 ms to the first token on an idle endpoint
SLOS = {"x-slo-ttft-ms": "500", "x-slo-tpot-ms": "100"}


def ctx(seed: int = 0) -> PluginContext:
    return PluginContext(ApproxPrefixIndex(), random.Random(seed), latency=LatencyModel(LatencySettings(prior=PRIOR)))


def load(body: str, c: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + body, "t.yaml", c or ctx())


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def ep(i: int, *, queued: int = 0, in_flight: int = 0, running: int = 0, kv: float = 0.5, waiting: int = 0) -> Endpoint:
    e = Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000, {}))
    e.in_flight_prefill_tokens, e.in_flight = queued, in_flight
    e.metrics = Metrics(running=running, kv_usage=kv, waiting=waiting, updated_at=1.0)
    return e


def req(headers: dict[str, str] | None = None, priority: int = 0) -> InferenceRequest:
    r = InferenceRequest("r", "/v1/completions", dict(headers or {}), "completions", "m", PROMPT)
    r.priority = priority
    return r


def legacy(params: str = "", c: PluginContext | None = None) -> PredictedLatencyScorer:
    cfg = load(f"plugins:\n- type: predicted-latency-scorer\n{params}", c)
    s = cfg.plugins["predicted-latency-scorer"]
    assert isinstance(s, PredictedLatencyScorer)
    return s


def chosen(scores: list[float], endpoints: list[Endpoint]) -> Endpoint:
    assert sorted(scores) == [0.0] * (len(scores) - 1) + [1.0]  # exactly one endpoint scores 1
    return endpoints[scores.index(1.0)]


def pred(ttft_room: float, tpot_room: float, dispatched: int = 1) -> LatencyPrediction:
    return LatencyPrediction(100.0, 20.0, ttft_room > 0, tpot_room > 0, ttft_room, tpot_room, dispatched, 0)


# -- GIE's weights (selection.py) -------------------------------------------------------------------


def test_positive_weights_favour_the_tightest_headroom_with_least_and_the_largest_with_most():
    tight, roomy = Candidate(ep(1), pred(190, 80)), Candidate(ep(2), pred(390, 80))
    # TTFT headroom normalized 0 and 1, TPOT without spread 0.5: blends 0.1 and 0.9
    assert positive_weights([tight, roomy], 0.8, 0.2, most=False) == [91, 11]
    assert positive_weights([tight, roomy], 0.8, 0.2, most=True) == [11, 91]
    assert positive_weights([tight, roomy], 0.0, 0.0, most=False) == [101, 2]  # both 0: TTFT alone


def test_negative_weights_follow_gies_buckets_and_deficits():
    both = Candidate(ep(1), pred(-100, -10))
    worse_both = Candidate(ep(2), pred(-300, -10))
    ttft_only = Candidate(ep(3), pred(-50, 5))
    neither = Candidate(ep(4), pred(0, 0))
    weights = {c.endpoint.name: w for c, w in negative_choices([neither, ttft_only, both, worse_both], 0.8, 0.2)}
    assert weights == {"pod-1": 82, "pod-2": 18, "pod-3": 82, "pod-4": 1}


def test_composite_weights_blend_free_kv_relative_queue_and_prefix():
    a = Candidate(ep(1, kv=0.0, waiting=0), pred(0, 0), prefix=1.0)
    b = Candidate(ep(2, kv=1.0, waiting=4), pred(0, 0), prefix=0.0)
    assert composite_weights([a, b], 1.0, 1.0, 1.0) == [100, 1]
    assert composite_weights([a, b], 1.0, 1.0, 1.0, least=True) == [1, 100]


def test_draws_follow_the_weights():
    a, b = Candidate(ep(1), pred(0, 0)), Candidate(ep(2), pred(0, 0))
    rng = random.Random(7)
    counts = Counter(draw([(a, 3), (b, 1)], rng).endpoint.name for _ in range(4000))  # type: ignore[union-attr]
    assert 2800 < counts["pod-1"] < 3200
    assert draw([(a, 3), (b, 5)], rng, argmax=True) is b
    assert draw([(a, 0), (b, 0)], rng) is None


# -- predicted-latency-scorer -------------------------------------------------------------------------


def test_the_legacy_scorer_chooses_one_endpoint_meeting_the_slos_over_one_that_does_not():
    s = legacy("  parameters: {epsilonExploreNeg: 0}\n")
    fast, slow = ep(1), ep(2, queued=9000)  # 110 ms and 1010 ms to the first token
    for _ in range(20):
        assert chosen(list(s.score(req(SLOS), CycleState(), [fast, slow])), [fast, slow]) is fast


def test_least_packs_onto_the_endpoint_closest_to_its_slo_and_most_spreads():
    closer, roomy = ep(1, queued=2000), ep(2)  # TTFT headroom 190 and 390 ms
    least = legacy("  parameters: {selectionMode: max}\n")
    assert chosen(list(least.score(req(SLOS), CycleState(), [closer, roomy])), [closer, roomy]) is closer
    most = legacy("  parameters: {selectionMode: max, headroomSelectionStrategy: most}\n")
    assert chosen(list(most.score(req(SLOS), CycleState(), [closer, roomy])), [closer, roomy]) is roomy


def test_linear_selection_draws_by_the_headroom_weights():
    s = legacy("  parameters: {epsilonExploreNeg: 0}\n", ctx(seed=3))
    closer, roomy = ep(1, queued=2000), ep(2)  # weights 91 and 11
    counts = Counter(chosen(list(s.score(req(SLOS), CycleState(), [closer, roomy])), [closer, roomy]).name for _ in range(1000))
    assert 850 < counts["pod-1"] < 950


def test_streaming_mode_is_on_by_default_so_a_tpot_slo_counts():
    s = legacy("  parameters: {epsilonExploreNeg: 0, selectionMode: max}\n")
    assert s.producer.streaming
    crowded, quiet = ep(1, running=90, queued=2000), ep(2)  # TTFT headroom 190 and 390 ms; TPOT 110 (over 100) and 20 ms
    assert chosen(list(s.score(req(SLOS), CycleState(), [crowded, quiet])), [crowded, quiet]) is quiet
    off = legacy("  parameters: {epsilonExploreNeg: 0, selectionMode: max, streamingMode: false}\n")
    # without streamingMode TPOT is not checked: both meet the TTFT SLO, and least packs onto the tighter one
    assert chosen(list(off.score(req(SLOS), CycleState(), [crowded, quiet])), [crowded, quiet]) is crowded


def test_without_slo_headers_idle_endpoints_are_chosen_first():
    s = legacy("  parameters: {selectionMode: max}\n")
    busy, idle = ep(1, in_flight=2), ep(2, in_flight=0, queued=5000)  # every headroom negative
    assert chosen(list(s.score(req(), CycleState(), [busy, idle])), [busy, idle]) is idle


def cached_on(c: PluginContext, s: PredictedLatencyScorer, endpoint: Endpoint) -> None:
    src = s.producer.source
    pm = prefix_match(req(), CycleState(), c.prefix_index, src.block_chars, src.max_blocks)
    c.prefix_index.record(endpoint.address, pm.hashes)


def test_the_global_affinity_gate_keeps_the_endpoint_holding_the_whole_prompt():
    c = ctx()
    s = legacy("  parameters: {epsilonExploreSticky: 0, selectionMode: max, headroomSelectionStrategy: most}\n", c)
    holder, roomy = ep(1, queued=2000), ep(2)
    cached_on(c, s, holder)
    # the holder also computes nothing (cached), so it is faster: make it slower by its queue
    holder.in_flight_prefill_tokens = 3000
    assert chosen(list(s.score(req(SLOS), CycleState(), [holder, roomy])), [holder, roomy]) is holder


def test_the_affinity_gate_breaks_when_stickiness_costs_more_ttft_than_allowed():
    c = ctx()
    s = legacy("  parameters: {epsilonExploreSticky: 0, selectionMode: max, affinityMaxTTFTPenaltyMs: 100}\n", c)
    holder, idle = ep(1, queued=20_000), ep(2)  # the holder: 2010 ms to the first token, the other 110 ms
    cached_on(c, s, holder)
    assert chosen(list(s.score(req(SLOS), CycleState(), [holder, idle])), [holder, idle]) is idle
    sticky = legacy("  parameters: {epsilonExploreSticky: 0, selectionMode: max, affinityMaxTTFTPenaltyMs: 0}\n", c)
    assert chosen(list(sticky.score(req(SLOS), CycleState(), [holder, idle])), [holder, idle]) is holder


def test_composite_only_chooses_by_free_kv_and_queue():
    s = legacy("  parameters: {headroomSelectionStrategy: composite-only, selectionMode: max}\n")
    full, free = ep(1, kv=0.9, waiting=5), ep(2, kv=0.1, waiting=0)
    assert chosen(list(s.score(req(SLOS), CycleState(), [full, free])), [full, free]) is free


def test_a_sheddable_request_no_endpoint_can_serve_in_time_is_refused_with_500():
    s = legacy()
    busy = [ep(1, queued=9000, in_flight=1), ep(2, queued=9000, in_flight=2)]
    with pytest.raises(RequestError) as e:
        s.admit_cycle(req(SLOS, priority=-1), CycleState(), busy)
    assert e.value.kind.status == 500
    assert e.value.message == "request cannot be admitted: no valid endpoint available to serve the request"
    s.admit_cycle(req(SLOS, priority=0), CycleState(), busy)  # not sheddable
    s.admit_cycle(req({"x-slo-ttft-ms": "500"}, priority=-1), CycleState(), busy)  # streaming: needs a TPOT SLO too
    s.admit_cycle(req(SLOS, priority=-1), CycleState(), [*busy, ep(3, queued=9000, in_flight=1, kv=0.01)])  # a cold one
    s.admit_cycle(req(SLOS, priority=-1), CycleState(), [*busy, ep(3, queued=9000, in_flight=0)])  # an idle one


def test_after_the_pick_the_request_tpot_slo_is_on_its_endpoint_until_it_ends():
    s = legacy()
    e = ep(1)
    r = req(SLOS)
    cycle = CycleState()
    s.score(r, cycle, [e])
    s.pre_request(r, cycle, SchedulingResult([e]))
    assert e.latency.min_tpot_slo == 100.0
    assert e.in_flight_prefill_tokens == 0  # the charge is the Director's to apply; the producer only plans it
    s.response_complete(r, e, 1000, 10)
    assert e.latency.min_tpot_slo == 0.0


def test_the_legacy_scorer_loads_with_gies_deprecation_and_its_parameters_as_given():
    cfg = load(
        "plugins:\n- type: predicted-latency-scorer\n  parameters: {sloBufferFactor: 0.9, samplingMean: 50, maxSampledTokens: 10,"
        " contextTTL: 60000000000, endpointRoleLabel: llm-d.ai/role}\n"
    )
    s = cfg.plugins["predicted-latency-scorer"]
    assert isinstance(s, PredictedLatencyScorer)
    assert (s.producer.slo_buffer, s.producer.role_label, s.producer.streaming) == (0.9, "llm-d.ai/role", True)
    text = "\n".join(cfg.warnings)
    assert "predicted-latency-scorer was removed from GIE" in text and "latency-scorer" in text
    assert "samplingMean and maxSampledTokens has no effect" in text
    assert "contextTTL has no effect" in text
    assert cfg.plugin_parameters["predicted-latency-scorer"]["contextTTL"] == 60000000000


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("sloBufferFactor: 0", "sloBufferFactor: predicted-latency-scorer: must be > 0, got 0"),
        ("samplingMean: 0", "samplingMean: predicted-latency-scorer: must be > 0, got 0"),
        ("epsilonExploreNeg: 1.5", "epsilonExploreNeg: predicted-latency-scorer: must be in [0, 1], got 1.5"),
        ("affinityGateTauGlobal: -1", "affinityGateTauGlobal: predicted-latency-scorer: must be in [0, 1], got -1"),
        ("headroomTTFTWeight: -0.1", "headroomTTFTWeight: predicted-latency-scorer: must be >= 0, got -0.1"),
        ("maxSampledTokens: -1", "maxSampledTokens: predicted-latency-scorer:"),
        ("headroomSelectionStrategy: fastest", "headroomSelectionStrategy: predicted-latency-scorer: expected one of least, most, composite-least"),
        ("selectionMode: argmax", "selectionMode: predicted-latency-scorer: expected one of linear, max"),
        ("ttftWeight: 1", "ttftWeight: predicted-latency-scorer: unknown parameter"),
    ],
)
def test_legacy_scorer_parameters_are_checked_by_name(params, message):
    assert message in error_of(f"plugins:\n- type: predicted-latency-scorer\n  parameters: {{{params}}}\n")


# -- the slo-prediction-experimental branch -------------------------------------------------------------

BRANCH = (CONFIGS / "gie-slo-experimental.yaml").read_text()
ON = {**SLOS, "x-prediction-based-scheduling": "true"}


def branch(c: PluginContext | None = None) -> tuple[Scheduler, EndpointPickerConfig]:
    cfg = load_config(BRANCH, "gie-slo-experimental.yaml", c or ctx())
    return Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), cfg


def test_the_slo_aware_handler_uses_the_slo_profile_only_when_the_header_asks():
    sched, _ = branch()
    fast, slow = ep(1), ep(2, queued=9000, waiting=0)
    slow.metrics = Metrics(waiting=0, kv_usage=0.1, updated_at=1.0)  # the default profile's favourite
    fast.metrics = Metrics(waiting=3, kv_usage=0.9, updated_at=1.0)
    assert sched.schedule(req(SLOS), [fast, slow]).profile == "default"
    assert sched.schedule(req(SLOS), [fast, slow]).endpoints == [slow]
    picks = {sched.schedule(req(ON), [fast, slow]).endpoints[0].name for _ in range(10)}
    result = sched.schedule(req(ON), [fast, slow])
    assert result.profile == "slo" and result.profile_results is None
    assert "pod-1" in picks  # the one meeting the SLOs (the other tier gets 1 request in 100)


@pytest.mark.parametrize("value", ["yes", "TRUE ", "2"])
def test_a_prediction_header_that_is_not_a_bool_is_a_400(value):
    sched, _ = branch()
    with pytest.raises(RequestError) as e:
        sched.schedule(req({"x-prediction-based-scheduling": value}), [ep(1)])
    assert e.value.kind.status == 400 and "x-prediction-based-scheduling must be a bool" in e.value.message


def test_an_slo_header_that_is_not_a_number_is_a_400():
    sched, _ = branch()
    with pytest.raises(RequestError) as e:
        sched.schedule(req({"x-slo-ttft-ms": "fast"}), [ep(1)])
    assert e.value.kind.status == 400 and e.value.message == "x-slo-ttft-ms must be a float, got 'fast'"


def test_the_branch_drops_a_sheddable_request_when_every_endpoint_is_busy_and_none_meets_its_slos():
    sched, _ = branch()
    busy = [ep(1, queued=9000, in_flight=1), ep(2, queued=9000, in_flight=3)]
    with pytest.raises(RequestError) as e:
        sched.schedule(req(ON, priority=-1), busy)
    assert (e.value.kind.status, e.value.message) == (429, "system saturated, sheddable request dropped")
    assert sched.schedule(req(ON, priority=0), busy).profile == "slo"
    assert sched.schedule(req(SLOS, priority=-1), busy).profile == "default"  # prediction-based scheduling off
    assert sched.schedule(req(ON, priority=-1), [*busy, ep(3, queued=9000)]).endpoints[0].name == "pod-3"  # idle first


def test_the_slo_scorer_has_no_opinion_without_the_header():
    _, cfg = branch()
    s = cfg.plugins["slo-scorer"]
    assert isinstance(s, SloScorer)
    assert list(s.score(req(SLOS), CycleState(), [ep(1), ep(2)])) == [0.0, 0.0]


def test_the_slo_scorers_positive_tier_needs_headroom_above_zero():
    _, cfg = branch()
    s = cfg.plugins["slo-scorer"]
    exact, fast = ep(1, queued=3000), ep(2)
    ttft = s.predictions(req(ON), CycleState(), [exact])[exact.address].ttft_ms  # type: ignore[attr-defined]
    headers = {**ON, "x-slo-ttft-ms": repr(ttft)}  # exactly its predicted TTFT: headroom 0
    picks = Counter(chosen(list(s.score(req(headers), CycleState(), [exact, fast])), [exact, fast]).name for _ in range(50))
    assert picks["pod-2"] >= 45  # the negative tier gets 1 request in 100


def test_the_tracker_keeps_a_requests_tpot_slo_on_its_endpoint_for_the_scorers_check():
    sched, cfg = branch()
    tracker = cfg.plugins["slo-request-tracker"]
    assert isinstance(tracker, SloRequestTracker)
    e = ep(1)
    r = req({**ON, "x-slo-tpot-ms": "15"})
    sched.schedule(r, [e])
    assert e.latency.min_tpot_slo == 15.0  # once, though the tracker is listed in both profiles
    sched.response_complete(r, e, 1000, 10)
    assert e.latency.min_tpot_slo == 0.0
    e.latency.add_tpot_slo(15.0)  # a running request wants 15 ms: this one's 100 ms SLO is bounded by it
    got = cfg.plugins["slo-scorer"].predictions(req(ON), CycleState(), [e])[e.address]  # type: ignore[attr-defined]
    assert got.tpot_headroom_ms == pytest.approx(15 - 20) and not got.tpot_valid


def test_the_slo_scorer_reads_the_branchs_environment(monkeypatch):
    monkeypatch.setenv("SLO_BUFFER_FACTOR", "0.5")
    monkeypatch.setenv("HEADROOM_SELECTION_STRATEGY", "MOST")
    monkeypatch.setenv("HEADROOM_TTFT_WEIGHT", "-1")
    monkeypatch.setenv("NEG_HEADROOM_TPOT_WEIGHT", "0.6")
    _, cfg = branch()
    s = cfg.plugins["slo-scorer"]
    assert isinstance(s, SloScorer)
    assert (s.producer.slo_buffer, s.most, s.weights, s.neg_weights) == (0.5, True, (0.8, 0.2), (0.8, 0.6))
    assert any("HEADROOM_TTFT_WEIGHT='-1' is ignored" in w for w in cfg.warnings)


def test_the_slo_aware_handler_needs_its_two_profiles():
    body = (
        "plugins:\n- type: slo-scorer\n- type: slo-aware-profile-handler\n"
        "schedulingProfiles:\n- name: slo\n  plugins: [{pluginRef: slo-scorer}]\n- name: other\n  plugins: [{pluginRef: slo-scorer}]\n"
    )
    assert "slo-aware-profile-handler: needs scheduling profiles 'default' and 'slo'" in error_of(body)
    assert "missing 'default'" in error_of(body)


def test_slo_scorer_and_tracker_take_no_parameters():
    assert "unknown parameter" in error_of("plugins:\n- type: slo-scorer\n  parameters: {headroomSelectionStrategy: most}\n")
    assert "unknown parameter" in error_of("plugins:\n- type: slo-request-tracker\n  parameters: {x: 1}\n")


def test_a_slo_scorer_without_the_tracker_loads_with_a_warning():
    cfg = load(
        "plugins:\n- type: slo-scorer\n- type: queue-scorer\n- type: slo-aware-profile-handler\nschedulingProfiles:\n"
        "- name: default\n  plugins: [{pluginRef: queue-scorer}]\n- name: slo\n  plugins: [{pluginRef: slo-scorer}]\n"
    )
    assert any("no slo-request-tracker in the config" in w for w in cfg.warnings)


# -- our configs in the guides' shapes ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gie-predicted-latency.yaml", "gie-predicted-latency-pd.yaml", "gie-slo-experimental.yaml"])
def test_gie_latency_guide_shapes_check_with_only_their_deprecation_warnings(name, capsys):
    path = CONFIGS / name
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.strip().startswith("warning:")]
    assert warnings and all("GIE" in w for w in warnings), warnings


def test_the_legacy_pd_shape_runs_the_scorer_in_both_profiles():
    cfg = load_config_file(CONFIGS / "gie-predicted-latency-pd.yaml", ctx())
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    prefill = Endpoint(EndpointSpec("p", "10.0.1.1", 8000, {"llm-d.ai/role": "prefill"}))
    decode = Endpoint(EndpointSpec("d", "10.0.1.2", 8000, {"llm-d.ai/role": "decode"}))
    for e in (prefill, decode):
        e.metrics = Metrics(kv_usage=0.5, updated_at=1.0)
    result = sched.schedule(req(SLOS), [prefill, decode])
    assert result.endpoints == [decode]
    assert result.request_headers == {"x-prefiller-host-port": prefill.address}
    assert decode.latency.min_tpot_slo == 100.0 and prefill.latency.min_tpot_slo == 0.0
