"""Each plugin's formula, built through the registry as a config would build it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pickers.config.registry import create_plugin
from pickers.framework.endpoint import ROLE_LABEL, Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult, ScoredEndpoint
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.affinity.session_affinity import session_token


def ep(i: int, labels: dict[str, str] | None = None, **metrics) -> Endpoint:
    return Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000, labels or {}), Metrics(**metrics))


def req(prompt: str = "hello", model: str = "m", headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", headers or {}, "completions", model, prompt)


def plugin(type_name: str, ctx: PluginContext | None = None, **parameters):
    return create_plugin(type_name, type_name, parameters, ctx or PluginContext(rng=random.Random(0)))


def scores(type_name: str, endpoints, request=None, ctx=None, **parameters) -> list[float]:
    return list(plugin(type_name, ctx, **parameters).score(request or req(), CycleState(), endpoints))


# -- scorers ---------------------------------------------------------------------------------


def test_queue_scorer_is_min_max_of_waiting():
    assert scores("queue-scorer", [ep(1, waiting=0), ep(2, waiting=5), ep(3, waiting=10)]) == [1.0, 0.5, 0.0]


def test_queue_scorer_ties_and_empty():
    assert scores("queue-scorer", [ep(1, waiting=3), ep(2, waiting=3)]) == [1.0, 1.0]
    assert scores("queue-scorer", []) == []
    assert scores("queue-scorer", [ep(1), ep(2)]) == [1.0, 1.0]  # never scraped: zeros, all equal


def test_running_requests_size_scorer_is_min_max_of_running():
    assert scores("running-requests-size-scorer", [ep(1, running=4), ep(2, running=0), ep(3, running=2)]) == [0.0, 1.0, 0.5]
    assert scores("running-requests-size-scorer", [ep(1, running=7), ep(2, running=7)]) == [1.0, 1.0]


def test_kv_cache_utilization_scorer_is_one_minus_usage():
    assert scores("kv-cache-utilization-scorer", [ep(1, kv_usage=0.25), ep(2), ep(3, kv_usage=1.0)]) == [0.75, 1.0, 0.0]


def test_load_aware_scorer():
    eps = [ep(1, waiting=0), ep(2, waiting=64), ep(3, waiting=128), ep(4, waiting=500)]
    assert scores("load-aware-scorer", eps) == [0.5, 0.25, 0.0, 0.0]
    assert scores("load-aware-scorer", [ep(1, waiting=5)], threshold=10) == [0.25]


def test_load_aware_scorer_threshold_must_be_positive():
    with pytest.raises(ConfigError, match="threshold"):
        plugin("load-aware-scorer", threshold=0)


def test_active_request_scorer_uses_the_epps_in_flight_counts():
    a, b, c = ep(1), ep(2), ep(3)
    a.in_flight, b.in_flight, c.in_flight = 4, 1, 0
    assert scores("active-request-scorer", [a, b, c]) == [0.0, 0.75, 1.0]


def test_active_request_scorer_all_idle_is_a_tie_at_one():
    assert scores("active-request-scorer", [ep(1), ep(2)]) == [1.0, 1.0]


def test_token_load_scorer():
    # in-flight load: the uncached prompt tokens not past their first byte (the request's own: none here)
    a, b, c = ep(1), ep(2), ep(3)
    a.in_flight_prefill_tokens, b.in_flight_prefill_tokens, c.in_flight_prefill_tokens = 0, 2_097_152, 10_000_000
    assert scores("token-load-scorer", [a, b, c], req("")) == [1.0, 0.5, 0.0]
    assert scores("token-load-scorer", [b], req(""), queueThresholdTokens=4_194_304 // 4) == [0.0]


def test_lora_affinity_scorer():
    running = ep(1, running_lora_adapters=frozenset({"ad"}), max_lora=1)
    room = ep(2, running_lora_adapters=frozenset({"x"}), max_lora=2)
    waiting = ep(3, running_lora_adapters=frozenset({"x"}), waiting_lora_adapters=frozenset({"ad"}), max_lora=2)
    full = ep(4, running_lora_adapters=frozenset({"x", "y"}), max_lora=2)
    no_info = ep(5)
    got = scores("lora-affinity-scorer", [running, room, waiting, full, no_info], req(model="ad"))
    assert got == [1.0, 0.8, 0.6, 0.0, 0.0]


def test_session_affinity_scorer_follows_the_token():
    eps = [ep(1), ep(2)]
    token = session_token(eps[1].address)
    assert scores("session-affinity-scorer", eps, req(headers={"x-session-token": token})) == [0.0, 1.0]


def test_session_affinity_scorer_without_or_with_a_bad_token_has_no_preference():
    eps = [ep(1), ep(2)]
    assert scores("session-affinity-scorer", eps) == [0.0, 0.0]
    assert scores("session-affinity-scorer", eps, req(headers={"x-session-token": "%%%"})) == [0.0, 0.0]


PROMPT = "a" * 64 * 4  # four 64-character blocks


def _pick(p, request, endpoints, chosen):
    cycle = CycleState()
    s = p.score(request, cycle, endpoints)
    p.pre_request(request, cycle, SchedulingResult([chosen]))
    return list(s)


def test_prefix_cache_scorer_is_matched_over_total_blocks():
    ctx = PluginContext()
    p = plugin("prefix-cache-scorer", ctx)
    a, b = ep(1), ep(2)
    assert _pick(p, req(PROMPT[:128]), [a, b], a) == [0.0, 0.0]  # records 2 blocks for a
    assert list(p.score(req(PROMPT), CycleState(), [a, b])) == [0.5, 0.0]
    assert list(p.score(req("short"), CycleState(), [a, b])) == [0.0, 0.0]  # under one block


def test_prefix_cache_scorer_parameters():
    ctx = PluginContext()
    p = plugin("prefix-cache-scorer", ctx, blockSize=32, maxPrefixBlocksToMatch=4, lruCapacityPerServer=3, autoTune=False)
    a = ep(1, num_gpu_blocks=1000, block_size=16)
    _pick(p, req(PROMPT), [a], a)
    assert ctx.prefix_index.blocks_of(a.address) == 3  # 4 blocks matched at most, LRU of 3 kept


def test_prefix_cache_scorer_auto_tune_sizes_the_lru_from_the_server():
    ctx = PluginContext()
    p = plugin("prefix-cache-scorer", ctx)  # 64 chars = 16 tokens per block
    a = ep(1, num_gpu_blocks=2, block_size=16)  # room for 2 of our blocks
    _pick(p, req(PROMPT), [a], a)
    assert ctx.prefix_index.blocks_of(a.address) == 2


def test_no_hit_lru_scorer_spreads_cold_requests_least_recently_used_first():
    ctx = PluginContext()
    p = plugin("no-hit-lru-scorer", ctx)
    a, b, c = ep(1), ep(2), ep(3)
    assert _pick(p, req("cold 1"), [a, b, c], b) == [1.0, 1.0, 1.0]
    assert _pick(p, req("cold 2"), [a, b, c], a) == [1.0, 0.5, 1.0]
    # b was used before a: b ranks above a, c never used is best
    assert p.score(req("cold 3"), CycleState(), [a, b, c]) == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]


def test_no_hit_lru_scorer_is_neutral_on_a_warm_request():
    ctx = PluginContext()
    prefix = plugin("prefix-cache-scorer", ctx)
    lru = plugin("no-hit-lru-scorer", ctx)
    a, b = ep(1), ep(2)
    _pick(prefix, req(PROMPT), [a, b], a)
    cycle = CycleState()
    prefix.score(req(PROMPT), cycle, [a, b])
    assert lru.score(req(PROMPT), cycle, [a, b]) == [0.5, 0.5]


# -- filters ---------------------------------------------------------------------------------


def _filter(type_name, endpoints, **parameters):
    return [e.name for e in plugin(type_name, **parameters).filter(req(), CycleState(), endpoints)]


ROLES = [ep(1, {ROLE_LABEL: "prefill"}), ep(2, {ROLE_LABEL: "decode"}), ep(3, {ROLE_LABEL: "both"}),
         ep(4, {ROLE_LABEL: "prefill-decode"}), ep(5), ep(6, {ROLE_LABEL: "other"})]  # fmt: skip


def test_decode_filter_keeps_decode_roles_and_unlabelled():
    assert _filter("decode-filter", ROLES) == ["pod-2", "pod-3", "pod-4", "pod-5"]


def test_prefill_filter_keeps_prefill_roles_only():
    assert _filter("prefill-filter", ROLES) == ["pod-1", "pod-3", "pod-4"]


def test_by_label_filter():
    eps = [ep(1, {"tier": "a"}), ep(2, {"tier": "b"}), ep(3)]
    assert _filter("by-label", eps, label="tier", validValues=["a"]) == ["pod-1"]
    assert _filter("by-label", eps, label="tier", validValues=["b"], allowsNoLabel=True) == ["pod-2", "pod-3"]


def test_by_label_filter_needs_values():
    with pytest.raises(ConfigError, match="validValues"):
        plugin("by-label", label="tier")


def test_label_selector_filter_needs_every_label():
    eps = [ep(1, {"a": "1", "b": "2"}), ep(2, {"a": "1"}), ep(3)]
    assert _filter("label-selector-filter", eps, matchLabels={"a": "1", "b": "2"}) == ["pod-1"]
    assert _filter("label-selector-filter", eps, matchLabels={"a": "1"}) == ["pod-1", "pod-2"]


SELECTOR_PODS = [ep(1, {"tier": "gold", "zone": "a"}), ep(2, {"tier": "silver"}), ep(3, {"zone": "b"}), ep(4)]


@pytest.mark.parametrize(
    ("expression", "kept"),
    [
        ({"key": "tier", "operator": "In", "values": ["gold", "silver"]}, ["pod-1", "pod-2"]),
        ({"key": "tier", "operator": "NotIn", "values": ["gold"]}, ["pod-2", "pod-3", "pod-4"]),  # absent key: kept
        ({"key": "zone", "operator": "Exists"}, ["pod-1", "pod-3"]),
        ({"key": "zone", "operator": "DoesNotExist"}, ["pod-2", "pod-4"]),
    ],
)
def test_label_selector_filter_match_expressions_follow_kubernetes(expression, kept):
    assert _filter("label-selector-filter", SELECTOR_PODS, matchExpressions=[expression]) == kept


def test_label_selector_filter_ands_labels_and_expressions():
    found = _filter("label-selector-filter", SELECTOR_PODS, matchLabels={"zone": "a"},
                    matchExpressions=[{"key": "tier", "operator": "Exists"}, {"key": "tier", "operator": "NotIn", "values": ["silver"]}])  # fmt: skip
    assert found == ["pod-1"]


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({}, "matchLabels or matchExpressions"),
        ({"matchExpressions": [{"key": "a", "operator": "Has"}]}, "matchExpressions[0].operator: expected one of In, NotIn"),
        ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "In needs at least one value"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "Exists takes no values"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0].key"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "value": "x"}]}, "matchExpressions[0].value: unknown field"),
        ({"matchExpressions": {"key": "a"}}, "expected a list of mappings"),
    ],
)
def test_label_selector_filter_refuses_a_bad_selector_naming_the_field(parameters, fragment):
    with pytest.raises(ConfigError) as e:
        plugin("label-selector-filter", **parameters)
    assert fragment in str(e.value)


def test_filters_on_empty_candidates():
    assert _filter("decode-filter", []) == []


# -- pickers ---------------------------------------------------------------------------------


def scored(*values: float) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(ep(i), v) for i, v in enumerate(values)]


def picks(type_name, cands, n=2000, **parameters) -> Counter[str]:
    p = plugin(type_name, **parameters)
    return Counter(p.pick(req(), cands)[0].name for _ in range(n))


def test_max_score_picker_picks_the_best_and_breaks_ties_at_random():
    assert picks("max-score-picker", scored(1.0, 3.0, 2.0), n=10) == {"pod-1": 10}
    tie = picks("max-score-picker", scored(3.0, 3.0, 1.0))
    assert set(tie) == {"pod-0", "pod-1"} and min(tie.values()) > 800


def test_max_score_picker_fallbacks_in_score_order():
    p = plugin("max-score-picker", maxNumOfEndpoints=3)
    assert [e.name for e in p.pick(req(), scored(1.0, 3.0, 2.0, 0.5))] == ["pod-1", "pod-2", "pod-0"]


def test_pickers_on_empty_candidates():
    for t in ("max-score-picker", "random-picker", "weighted-random-picker"):
        assert plugin(t).pick(req(), []) == []


def test_random_picker_ignores_scores():
    got = picks("random-picker", scored(100.0, 0.0))
    assert min(got.values()) > 800


def test_weighted_random_picker_is_proportional_to_score():
    got = picks("weighted-random-picker", scored(3.0, 1.0, 0.0), n=4000)
    assert "pod-2" not in got
    assert 0.70 < got["pod-0"] / 4000 < 0.80


def test_weighted_random_picker_all_zero_is_uniform_and_fallbacks_are_distinct():
    got = picks("weighted-random-picker", scored(0.0, 0.0))
    assert min(got.values()) > 800
    p = plugin("weighted-random-picker", maxNumOfEndpoints=3)
    chosen = p.pick(req(), scored(1.0, 2.0, 0.0))
    assert len({e.name for e in chosen}) == 3 and chosen[-1].name == "pod-2"


def test_max_num_of_endpoints_must_be_positive():
    with pytest.raises(ConfigError, match="maxNumOfEndpoints"):
        plugin("max-score-picker", maxNumOfEndpoints=0)


def test_active_request_scorer_with_max_requests_is_absolute():
    a, b, c = ep(1), ep(2), ep(3)
    a.in_flight, b.in_flight, c.in_flight = 8, 40, 0
    assert scores("active-request-scorer", [a, b, c], maxRequests=32) == [0.75, 0.0, 1.0]


def test_prefill_load_scorer_counts_uncached_prompt_plus_queued_prefill():
    from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes

    index = ApproxPrefixIndex()
    ctx = PluginContext(prefix_index=index, rng=random.Random(0))
    prompt = "x" * 6400  # 100 blocks of 64 characters = 1,600 tokens
    r = req(prompt)
    a, b, c = ep(1), ep(2), ep(3)
    index.record(a.address, block_hashes("m", prompt))  # a holds the whole prompt
    # a: nothing to compute; b: the whole prompt; c: the whole prompt + 800 tokens queued
    c.in_flight_prefill_tokens = 800
    assert scores("prefill-load-scorer", [a, b, c], r, ctx) == [1.0, 0.0, 0.0]
    # a's queue of 800 tokens is still cheaper than b's full prefill of 1,600
    a.in_flight_prefill_tokens = 800
    assert scores("prefill-load-scorer", [a, b], r, ctx) == [1.0, 0.5]


def test_prefill_load_scorer_ties_and_empty():
    ctx = PluginContext(rng=random.Random(0))
    assert scores("prefill-load-scorer", [ep(1), ep(2)], req("y" * 640), ctx) == [1.0, 1.0]
    assert scores("prefill-load-scorer", [], req("y"), ctx) == []


def test_prefill_load_scorer_tells_the_director_the_primarys_uncached_tokens():
    ctx = PluginContext(rng=random.Random(0))
    p = plugin("prefill-load-scorer", ctx)
    cycle, r, a = CycleState(), req("z" * 640), ep(1)
    p.score(r, cycle, [a])
    result = SchedulingResult([a])
    p.pre_request(r, cycle, result)
    assert result.prefill_tokens == 160
