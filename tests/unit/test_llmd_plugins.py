"""llm-d's prefix-cache-affinity-filter, token-load-scorer and inflight-load-producer, context-length-aware
and header-profile-handler: their formulas, defaults and refusals, the configs of llm-d's guides (ours,
in their shape) through the loader and `epp check-config`, and such a config serving requests through
the Director."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import EndpointPickerConfig, load_config, load_config_file
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from pickers.plugins.base import PluginContext
from pickers.plugins.filter.context_length import parse_range, range_score
from pickers.plugins.scorer.affinity.prefix import uncached_tokens
from tests.unit.test_protocol import (
    completion_body,
    response_body_msg,
    response_headers_msg,
    send_request,
    set_headers,
)

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
BLOCK = 256  # characters: llm-d's approx-prefix-cache-producer default (64 tokens, 4 characters each)
PROMPT = "".join(f"{i:04d}" for i in range(1000))  # 4,000 characters: 15 whole blocks, 1,000 tokens


def load(body: str, ctx: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + body, "t.yaml", ctx or PluginContext(ApproxPrefixIndex(), random.Random(0)))


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def ep(i: int, labels: dict[str, str] | None = None, load_tokens: int = 0) -> Endpoint:
    e = Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000, labels or {}))
    e.in_flight_prefill_tokens = load_tokens
    return e


def req(prompt: str = PROMPT, headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", headers or {}, "completions", "m", prompt)


def hold(ctx: PluginContext, endpoint: Endpoint, blocks: int, prompt: str = PROMPT) -> None:
    """The endpoint holds the prompt's first `blocks` blocks (as if it had served it)."""
    ctx.prefix_index.record(endpoint.address, block_hashes("m", prompt, "", blocks, BLOCK))


def affinity(params: str = "", ctx: PluginContext | None = None):
    ctx = ctx or PluginContext(ApproxPrefixIndex(), random.Random(0))
    cfg = load(f"plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {{{params}}}\n", ctx)
    return cfg.plugins["prefix-cache-affinity-filter"], ctx


def kept(f, endpoints, request=None) -> list[str]:
    return [e.name for e in f.filter(request or req(), CycleState(), endpoints)]


# -- prefix-cache-affinity-filter ------------------------------------------------------------


def test_affinity_filter_defaults_are_llm_ds():
    cfg = load("plugins:\n- type: prefix-cache-affinity-filter\n")
    assert cfg.plugin_parameters["prefix-cache-affinity-filter"] == {
        "affinityThreshold": 0.8, "explorationProbability": 0.0, "maxTTFTPenaltyMs": 18000.0,
        "ttftSource": "prefillThroughput", "peakPrefillThroughput": 15928.0,
        "prefixMatchInfoProducerName": None, "inFlightLoadProducerName": None,
    }  # fmt: skip


def test_affinity_filter_keeps_the_endpoints_holding_at_least_the_threshold_share_of_the_prompt():
    f, ctx = affinity()
    a, b, c = ep(1), ep(2), ep(3)
    hold(ctx, a, 15)  # all 15 blocks: 1.0
    hold(ctx, b, 12)  # 12 / 15 = 0.8: warm (>=)
    hold(ctx, c, 11)  # 0.73: cold
    assert kept(f, [a, b, c]) == ["pod-1", "pod-2"]


def test_affinity_filter_keeps_everyone_when_no_endpoint_is_warm():
    f, ctx = affinity()
    a, b = ep(1), ep(2)
    hold(ctx, a, 5)
    assert kept(f, [a, b]) == ["pod-1", "pod-2"]
    assert kept(f, [a, b], req("short")) == ["pod-1", "pod-2"]  # no whole block: nobody is warm


def test_affinity_filter_is_off_for_one_candidate_or_a_threshold_of_zero():
    f, ctx = affinity("affinityThreshold: 0")
    a, b = ep(1), ep(2)
    hold(ctx, a, 15)
    assert kept(f, [a, b]) == ["pod-1", "pod-2"]
    f, ctx = affinity()
    assert kept(f, [b]) == ["pod-2"]


def test_affinity_filter_explores_with_its_probability():
    f, ctx = affinity("explorationProbability: 1.0")
    a, b = ep(1), ep(2)
    hold(ctx, a, 15)
    assert kept(f, [a, b]) == ["pod-1", "pod-2"]
    f, ctx = affinity("explorationProbability: 0.25")
    hold(ctx, a, 15)
    opened = sum(len(kept(f, [a, b])) == 2 for _ in range(4000))
    assert 850 < opened < 1150


@pytest.mark.parametrize(
    "penalty, sticky_load, cold_load, expected",
    [
        # peakPrefillThroughput 1000 tokens/s: TTFT ms = in-flight tokens
        (100, 500, 50, ["pod-1", "pod-2"]),  # 450 ms worse than the cold one > 100: stickiness broken
        (1000, 500, 50, ["pod-1"]),  # within the cap: stay warm
        (450, 500, 50, ["pod-1"]),  # exactly the cap is not more than it
        (0, 5_000_000, 0, ["pod-1"]),  # 0: always stick
    ],
)
def test_affinity_filter_ttft_gate_compares_the_best_warm_and_best_cold_estimates(penalty, sticky_load, cold_load, expected):
    f, ctx = affinity(f"maxTTFTPenaltyMs: {penalty}, peakPrefillThroughput: 1000")
    a, b = ep(1, load_tokens=sticky_load), ep(2, load_tokens=cold_load)
    hold(ctx, a, 15)
    assert kept(f, [a, b]) == expected


def test_affinity_filter_gate_uses_the_least_loaded_of_each_side():
    f, ctx = affinity("maxTTFTPenaltyMs: 100, peakPrefillThroughput: 1000")
    warm_busy, warm_idle, cold = ep(1, load_tokens=9000), ep(2, load_tokens=0), ep(3, load_tokens=0)
    hold(ctx, warm_busy, 15)
    hold(ctx, warm_idle, 15)
    assert kept(f, [warm_busy, warm_idle, cold]) == ["pod-1", "pod-2"]


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ("affinityThreshold: 1.5", "affinityThreshold", "expected a number <= 1.0"),
        ("explorationProbability: -0.1", "explorationProbability", "expected a number >= 0"),
        ("explorationProbability: 1.5", "explorationProbability", "expected a number in [0, 1]"),
        ("maxTTFTPenaltyMs: -1", "maxTTFTPenaltyMs", "expected a number >= 0"),
        ("peakPrefillThroughput: -1", "peakPrefillThroughput", "expected a number >= 0"),
        ("peakPrefillThroughput: 0", "peakPrefillThroughput", "must be > 0 when ttftSource is prefillThroughput"),
        ("ttftSource: bogus", "ttftSource", "expected prefillThroughput or latencyPredictor"),
        ("ttftSource: ''", "ttftSource", "expected prefillThroughput or latencyPredictor"),
        ("affinityThreshold: .nan", "affinityThreshold", "expected a finite number"),
        ("maxTokensInFlightPenalty: 286720", "maxTokensInFlightPenalty", "maxTTFTPenaltyMs = maxTokensInFlightPenalty / peakPrefillThroughput * 1000"),
        ("affinityTreshold: 0.9", "affinityTreshold", "unknown parameter"),
    ],
)
def test_affinity_filter_refuses_bad_parameters_naming_them(params, field, fragment):
    msg = error_of(f"plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {{{params}}}\n")
    assert f"plugins[0].parameters.{field}: prefix-cache-affinity-filter: " in msg and fragment in msg


def test_affinity_filter_settings_unused_with_the_gate_off_load_with_a_warning():
    cfg = load("plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {maxTTFTPenaltyMs: 0, ttftSource: latencyPredictor, "
               "peakPrefillThroughput: 0, latencyPredictionInfoProducerName: lp}\n")  # fmt: skip
    assert len(cfg.warnings) == 3
    for key in ("ttftSource", "peakPrefillThroughput", "latencyPredictionInfoProducerName"):
        assert any(f"{key} has no effect with maxTTFTPenaltyMs 0" in w for w in cfg.warnings)


def test_affinity_filter_settings_of_the_other_ttft_source_load_with_a_warning():
    cfg = load("plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {ttftSource: latencyPredictor, peakPrefillThroughput: 0}\n")
    assert [w for w in cfg.warnings if "peakPrefillThroughput has no effect with ttftSource latencyPredictor" in w]
    cfg = load("plugins:\n- type: predicted-latency-producer\n- type: prefix-cache-affinity-filter\n"
               "  parameters: {latencyPredictionInfoProducerName: predicted-latency-producer}\n")  # fmt: skip
    assert [w for w in cfg.warnings if "latencyPredictionInfoProducerName has no effect with ttftSource prefillThroughput" in w]
    assert cfg.plugins["prefix-cache-affinity-filter"].latency is None


# -- ttftSource latencyPredictor: the gate on the latency model's predicted TTFT -------------


def predictor_affinity(params: str = "", producer: str = ""):
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    cfg = load(f"plugins:\n{producer}- type: prefix-cache-affinity-filter\n"
               f"  parameters: {{ttftSource: latencyPredictor, {params}}}\n", ctx)  # fmt: skip
    return cfg.plugins["prefix-cache-affinity-filter"], ctx


def test_predictor_gate_breaks_stickiness_when_the_warm_endpoints_predicted_ttft_is_worse_by_more_than_the_cap():
    # the model's prior: 20 ms + tokens / 15,928 tokens/s. Warm: 40 uncached tokens behind 100,000 queued
    # (~6.3 s); cold: the whole 1,000-token prompt, nothing queued (~83 ms)
    for penalty, expected in ((5000, ["pod-1", "pod-2"]), (10000, ["pod-1"])):
        f, ctx = predictor_affinity(f"maxTTFTPenaltyMs: {penalty}")
        warm, cold = ep(1, load_tokens=100_000), ep(2)
        hold(ctx, warm, 15)
        assert kept(f, [warm, cold]) == expected
        assert f.best_ttft_ms(req(), CycleState(), [warm]) == pytest.approx((0.020 + 100_040 / 15_928) * 1000)


def test_predictor_gate_reads_each_endpoints_own_fitted_rate_not_one_throughput():
    # Same queue on both; the warm one's fit says it prefills 50x slower than the prior (a CPU server),
    # so its 40 uncached tokens behind 20,000 queued take ~63 s against the cold one's ~1.3 s
    f, ctx = predictor_affinity("maxTTFTPenaltyMs: 5000")
    warm, cold = ep(1, load_tokens=20_000), ep(2, load_tokens=20_000)
    hold(ctx, warm, 15)
    for _ in range(30):
        ctx.latency.observe_ttft(warm, 2000, 0, 0.020 + 2000 * 50 / 15_928)
    assert kept(f, [warm, cold]) == ["pod-1", "pod-2"]
    # with the in-flight estimate both look alike (20,000 tokens / 15,928 tokens/s): the warm one is kept
    g, ctx2 = affinity("maxTTFTPenaltyMs: 5000", ctx)
    assert kept(g, [warm, cold]) == ["pod-1"]


def test_predictor_gate_without_predictions_never_opens():
    # a named producer with predictInProduce off predicts nothing: no endpoint has a TTFT (llm-d's MaxFloat64)
    f, ctx = predictor_affinity("maxTTFTPenaltyMs: 1, latencyPredictionInfoProducerName: lp",
                                "- {type: predicted-latency-producer, name: lp, parameters: {predictInProduce: false}}\n")  # fmt: skip
    warm, cold = ep(1, load_tokens=10_000_000), ep(2)
    hold(ctx, warm, 15)
    assert kept(f, [warm, cold]) == ["pod-1"]


def test_predictor_gate_reads_the_named_producer_and_refuses_a_dangling_name():
    f, ctx = predictor_affinity("latencyPredictionInfoProducerName: lp", "- {type: predicted-latency-producer, name: lp}\n")
    assert f.latency is not None and f.latency.name == "lp" and not f.latency_implied
    f, ctx = predictor_affinity()
    assert f.latency is not None and f.latency_implied  # none in the config: one with llm-d's defaults
    msg = error_of("plugins:\n- {type: prefix-cache-affinity-filter, parameters: {ttftSource: latencyPredictor, "
                   "latencyPredictionInfoProducerName: nope}}\n")  # fmt: skip
    assert "plugins[0].parameters.latencyPredictionInfoProducerName" in msg and "'nope': no plugin" in msg


def test_predictor_gate_shows_its_predictions_under_explain_and_records_the_uncached_tokens():
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    cfg = load("plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {ttftSource: latencyPredictor}\n"
               "- type: random-picker\n", ctx)  # fmt: skip
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, explain=True)
    warm, cold = ep(1), ep(2)
    hold(ctx, warm, 15)
    result = sched.schedule(req(), [warm, cold])
    assert result.endpoints == [warm]
    assert set(result.scores["predicted-latency-producer/ttft_ms"]) == {warm.address, cold.address}
    assert result.uncached == {warm.address: 40}  # for the latency model's record of the pick


def test_affinity_filter_reads_the_named_producers_and_refuses_dangling_names():
    cfg = load(
        "plugins:\n- {type: approx-prefix-cache-producer, name: apc, parameters: {blockSizeTokens: 128}}\n"
        "- {type: inflight-load-producer, name: ifl}\n"
        "- {type: prefix-cache-affinity-filter, parameters: {prefixMatchInfoProducerName: apc, inFlightLoadProducerName: ifl}}\n"
    )
    f = cfg.plugins["prefix-cache-affinity-filter"]
    assert f.source is cfg.plugins["apc"] and f.load is cfg.plugins["ifl"] and f.source.block_chars == 512
    msg = error_of("plugins:\n- {type: prefix-cache-affinity-filter, parameters: {inFlightLoadProducerName: nope}}\n")
    assert "plugins[0].parameters.inFlightLoadProducerName" in msg and "'nope': no plugin" in msg
    msg = error_of("plugins:\n- type: queue-scorer\n- {type: prefix-cache-affinity-filter, parameters: {prefixMatchInfoProducerName: queue-scorer}}\n")
    assert "plugins[1].parameters.prefixMatchInfoProducerName" in msg and "is not an approx-prefix-cache-producer" in msg


def test_affinity_filter_shares_the_prefix_scorers_match_when_the_config_has_no_producer():
    cfg = load("plugins:\n- {type: prefix-cache-scorer, parameters: {blockSize: 128}}\n- type: prefix-cache-affinity-filter\n")
    assert cfg.plugins["prefix-cache-affinity-filter"].source is cfg.plugins["prefix-cache-scorer"]


# -- after the pick: the blocks are recorded and the prefill work counted, once ----------------


def scheduler_for(body: str, ctx: PluginContext) -> Scheduler:
    cfg = load(body, ctx)
    return Scheduler(cfg.profiles, handler=cfg.profile_handler)


def test_the_filter_alone_records_the_pick_so_the_next_request_with_the_prompt_sticks():
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    sched = scheduler_for("plugins:\n- type: prefix-cache-affinity-filter\n- type: random-picker\n", ctx)
    eps = [ep(1), ep(2), ep(3)]
    first = sched.schedule(req(), eps)
    assert first.prefill_tokens == 1000  # nothing cached anywhere: the whole prompt
    chosen = {sched.schedule(req(PROMPT + f" question {i}"), eps).endpoints[0].name for i in range(20)}
    assert chosen == {first.endpoints[0].name}
    again = sched.schedule(req(), eps)
    assert again.prefill_tokens == 1000 - 15 * 64  # only the tail past the 15 cached blocks


def test_the_prompt_is_recorded_once_however_many_plugins_read_the_match():
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    calls = []
    record = ctx.prefix_index.record
    ctx.prefix_index.record = lambda *a, **k: (calls.append(a[0]), record(*a, **k))  # type: ignore[method-assign]
    sched = scheduler_for(
        "plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n- type: prefix-cache-affinity-filter\n"
        "- type: token-load-scorer\n",
        ctx,
    )
    sched.schedule(req(), [ep(1), ep(2)])
    assert len(calls) == 1


# -- token-load-scorer and inflight-load-producer --------------------------------------------


def test_uncached_tokens_counts_the_missing_blocks_and_the_tail_past_the_match():
    assert uncached_tokens(1000, 0, 15, 64) == 1000
    assert uncached_tokens(1000, 15, 15, 64) == 40
    assert uncached_tokens(1000, 10, 15, 64) == 5 * 64 + 40
    assert uncached_tokens(10_000, 2, 4, 64) == 2 * 64 + (10_000 - 256)  # match capped at 4 blocks
    assert uncached_tokens(30, 0, 0, 64) == 30  # shorter than a block


def test_token_load_scorer_adds_the_requests_own_uncached_tokens_to_the_in_flight_load():
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    cfg = load("plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 4000}\n", ctx)
    scorer = cfg.plugins["token-load-scorer"]
    warm, cold, busy = ep(1), ep(2), ep(3, load_tokens=3500)
    hold(ctx, warm, 15)
    # own tokens: 40 (warm: the tail), 1000 (cold), 1000 (busy: 3500 + 1000 > 4000)
    assert scorer.score(req(), CycleState(), [warm, cold, busy]) == [1 - 40 / 4000, 1 - 1000 / 4000, 0.0]
    assert scorer.score(req(""), CycleState(), [ep(4)]) == [1.0]


def test_token_load_scorer_threshold_not_positive_is_the_default_as_in_llm_d():
    cfg = load("plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 0}\n")
    assert cfg.plugins["token-load-scorer"].threshold_tokens == 4_194_304
    assert cfg.plugin_parameters["token-load-scorer"]["queueThresholdTokens"] == 4_194_304
    assert any("queueThresholdTokens 0 is not positive; using 4194304" in w for w in cfg.warnings)


def test_peak_prefill_throughput_on_the_token_load_scorer_points_to_the_filter():
    msg = error_of("plugins:\n- type: token-load-scorer\n  parameters: {peakPrefillThroughput: 15928}\n")
    assert "plugins[0].parameters.peakPrefillThroughput: token-load-scorer: not a token-load-scorer parameter" in msg
    assert "prefix-cache-affinity-filter" in msg


@pytest.mark.parametrize(
    "params, fragment",
    [
        ("addEstimatedOutputTokens: 1", "addEstimatedOutputTokens: inflight-load-producer: expected true or false"),
        ("outputRatio: -1", "outputRatio: inflight-load-producer: expected a number >= 0"),
        ("maxEstimatedOutputTokens: -5", "maxEstimatedOutputTokens: inflight-load-producer: expected an integer >= 0"),
        ("prefixMatchInfoProducerName: nope", "prefixMatchInfoProducerName: inflight-load-producer: no plugin named 'nope'"),
    ],
)
def test_inflight_load_producer_refuses_what_it_cannot_honour(params, fragment):
    msg = error_of(f"plugins:\n- type: inflight-load-producer\n  parameters: {{{params}}}\n- type: token-load-scorer\n")
    assert fragment in msg


def test_inflight_load_producer_parameters_without_effect_load_with_a_warning():
    cfg = load("plugins:\n- type: inflight-load-producer\n  parameters: {outputRatio: 2, maxEstimatedOutputTokens: 100, "
               "syncCrossReplicaState: true}\n- type: token-load-scorer\n")  # fmt: skip
    assert sum("has no effect" in w for w in cfg.warnings) == 3
    quiet = load("plugins:\n- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: false, syncCrossReplicaState: false}\n")
    assert quiet.warnings == ()


def test_two_inflight_load_producers_need_a_name():
    msg = error_of("plugins:\n- {type: inflight-load-producer, name: a}\n- {type: inflight-load-producer, name: b}\n- type: token-load-scorer\n")
    assert "plugins[2].parameters.inFlightLoadProducerName" in msg and "name the one" in msg


# -- context-length-aware --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("0-2048", (0, 2048)), (" 10 - 20 ", (10, 20)), ("+5-7", (5, 7)), ("7-7", (7, 7)), ("8-7", None), ("a-b", None),
     ("1-2-3", None), ("-5", None), ("2048", None), ("", None), ("1_0-20", None), ("0-99999999999999999999", None)],
)  # fmt: skip
def test_context_range_label_parses_as_llm_d_does(value, expected):
    assert parse_range(value) == expected


def test_context_range_score_prefers_tight_in_range_then_near_out_of_range():
    assert range_score(1000, 1000, 1000) == 1.0
    assert range_score(1000, 0, 2048) == pytest.approx(0.3 + 0.7 * (0.7 / 1.2048 + 0.3 * 1048 / 2048))
    assert range_score(1000, 0, 2048) > range_score(1000, 0, 100_000) > 0.3  # tighter wins, in range beats out
    assert range_score(9000, 0, 8192) == pytest.approx(0.3 / 1.808)
    assert range_score(9000, 0, 8192) > range_score(9000, 0, 2048)  # nearer out-of-range range wins
    assert range_score(10, 2048, 8192) == pytest.approx(0.3 / 3.038)


def test_context_length_aware_scores_unlabelled_neutral_and_bad_labels_zero():
    cfg = load("plugins:\n- type: context-length-aware\n")
    p = cfg.plugins["context-length-aware"]
    label = "llm-d.ai/context-length-range"
    eps = [ep(1, {label: "0-2048"}), ep(2, {label: "2049-8192"}), ep(3), ep(4, {label: "big"})]
    s = p.score(req(), CycleState(), eps)  # 1,000 tokens
    assert s[0] == range_score(1000, 0, 2048) and s[1] == range_score(1000, 2049, 8192)
    assert s[2:] == [0.5, 0.0]
    assert p.filter(req(), CycleState(), eps) == eps  # filtering off by default


def test_context_length_aware_filters_out_of_range_and_unparsable_with_enable_filtering():
    cfg = load("plugins:\n- type: context-length-aware\n  parameters: {enableFiltering: true, label: ctx}\n")
    p = cfg.plugins["context-length-aware"]
    eps = [ep(1, {"ctx": "0-2048"}), ep(2, {"ctx": "2049-8192"}), ep(3), ep(4, {"ctx": "oops"})]
    assert [e.name for e in p.filter(req(), CycleState(), eps)] == ["pod-1", "pod-3"]
    assert [e.name for e in p.filter(req("x" * 20_000), CycleState(), eps)] == ["pod-2", "pod-3"]


def test_context_length_aware_runs_as_filter_and_scorer_in_a_profile(tmp_path, capsys):
    body = ("plugins:\n- type: context-length-aware\n  parameters: {enableFiltering: true}\n- type: queue-scorer\n"
            "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: context-length-aware, weight: 3}\n  - pluginRef: queue-scorer\n")  # fmt: skip
    profile = load(body).profile
    assert [f.name for f in profile.filters] == ["context-length-aware"]
    assert [(w.scorer.name, w.weight) for w in profile.scorers] == [("context-length-aware", 3.0), ("queue-scorer", 1.0)]
    path = tmp_path / "ctx.yaml"
    path.write_text(HEADER + body)
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "    filters: context-length-aware\n    scorers: context-length-aware x3, queue-scorer x1\n" in out
    assert "    context-length-aware: label=llm-d.ai/context-length-range, enableFiltering=true\n" in out


def test_context_length_aware_needs_a_label():
    assert "plugins[0].parameters.label: context-length-aware: must be specified" in error_of(
        "plugins:\n- type: context-length-aware\n  parameters: {label: ''}\n"
    )


# -- header-profile-handler ------------------------------------------------------------------

STAGES = (
    "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: header-profile-handler\n{params}"
    "schedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n"
    "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n"
)
PREFILL, DECODE = ep(1, {"llm-d.ai/role": "prefill"}), ep(2, {"llm-d.ai/role": "decode"})


def stage_scheduler(params: str = "") -> tuple[Scheduler, EndpointPickerConfig]:
    cfg = load(STAGES.format(params=params))
    return Scheduler(cfg.profiles, handler=cfg.profile_handler), cfg


def test_header_profile_handler_runs_the_profile_the_header_names():
    sched, cfg = stage_scheduler()
    assert cfg.plugin_parameters["header-profile-handler"] == {"headerName": "epp-profile", "defaultProfile": "decode"}
    result = sched.schedule(req(headers={"epp-profile": " prefill "}), [PREFILL, DECODE])
    assert (result.profile, result.endpoints) == ("prefill", [PREFILL])
    result = sched.schedule(req(headers={"epp-profile": "decode"}), [PREFILL, DECODE])
    assert (result.profile, result.endpoints, result.request_headers) == ("decode", [DECODE], {})


def test_header_profile_handler_runs_the_default_profile_without_the_header():
    sched, _ = stage_scheduler()
    assert sched.schedule(req(), [PREFILL, DECODE]).profile == "decode"
    assert sched.schedule(req(headers={"epp-profile": "  "}), [PREFILL, DECODE]).profile == "decode"
    sched, _ = stage_scheduler("  parameters: {defaultProfile: prefill, headerName: ' X-Stage '}\n")
    assert sched.schedule(req(), [PREFILL, DECODE]).profile == "prefill"
    assert sched.schedule(req(headers={"x-stage": "decode"}), [PREFILL, DECODE]).profile == "decode"


def test_header_naming_no_profile_is_a_400_naming_the_value():
    sched, _ = stage_scheduler()
    with pytest.raises(RequestError) as e:
        sched.schedule(req(headers={"epp-profile": "Prefill"}), [PREFILL, DECODE])  # names match exactly
    assert e.value.kind.status == 400
    assert e.value.message == "no scheduling profile configured for epp-profile header value 'Prefill'"


def test_a_default_profile_that_does_not_exist_loads_with_a_warning_and_headerless_requests_get_400():
    sched, cfg = stage_scheduler("  parameters: {defaultProfile: encode}\n")
    assert any("defaultProfile 'encode' is not a scheduling profile (prefill, decode)" in w for w in cfg.warnings)
    assert sched.schedule(req(headers={"epp-profile": "prefill"}), [PREFILL, DECODE]).profile == "prefill"
    with pytest.raises(RequestError) as e:
        sched.schedule(req(), [PREFILL, DECODE])
    assert e.value.kind.status == 400 and "missing epp-profile header" in e.value.message


def test_with_one_profile_it_always_runs_whatever_the_header_says():
    cfg = load("plugins:\n- type: decode-filter\n- type: header-profile-handler\n"
               "schedulingProfiles:\n- name: only\n  plugins:\n  - pluginRef: decode-filter\n")  # fmt: skip
    assert cfg.warnings == ()
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler)
    assert sched.schedule(req(headers={"epp-profile": "elsewhere"}), [DECODE]).profile == "only"


def test_the_named_profiles_failure_is_the_requests():
    sched, _ = stage_scheduler()
    with pytest.raises(RequestError) as e:
        sched.schedule(req(headers={"epp-profile": "prefill"}), [DECODE])
    assert e.value.kind.status == 429  # every endpoint filtered out of the prefill profile


def test_header_phase_profile_handler_is_the_same_handler_reading_epp_phase():
    cfg = load_config_file(Path(__file__).parent / "configs" / "coordinator-epd-phase.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))
    assert cfg.plugin_parameters["header-phase-profile-handler"] == {"headerName": "epp-phase", "defaultProfile": "decode"}
    (warning,) = cfg.warnings
    assert "header-phase-profile-handler is the pre-release name of header-profile-handler" in warning
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler)
    encoder = ep(3, {"llm-d.ai/role": "encode"})
    assert sched.schedule(req(headers={"epp-phase": "encode"}), [encoder, PREFILL, DECODE]).endpoints == [encoder]
    assert sched.schedule(req(headers={"epp-phase": "prefill"}), [encoder, PREFILL, DECODE]).endpoints == [PREFILL]
    # the released name's header means nothing to it: the default profile runs
    assert sched.schedule(req(headers={"epp-profile": "prefill"}), [encoder, PREFILL, DECODE]).profile == "decode"


def test_header_phase_profile_handler_takes_header_profile_handlers_parameters():
    cfg = load(STAGES.replace("header-profile-handler", "header-phase-profile-handler").format(
        params="  parameters: {headerName: X-Stage, defaultProfile: prefill}\n"))  # fmt: skip
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler)
    assert sched.schedule(req(headers={"x-stage": "decode"}), [PREFILL, DECODE]).profile == "decode"
    assert sched.schedule(req(), [PREFILL, DECODE]).profile == "prefill"
    with pytest.raises(ConfigError) as e:
        load(STAGES.replace("header-profile-handler", "header-phase-profile-handler").format(params="  parameters: {phaseHeader: x}\n"))
    assert "phaseHeader: header-phase-profile-handler: unknown parameter" in str(e.value)


# -- llm-d's optimized-baseline guide, in its shape ------------------------------------------

# Ours, shaped like the guide's router values: producers listed explicitly, the filter in front of the
# token-load-scorer, a calibrated throughput.
OPTIMIZED_BASELINE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-load-scorer
- type: inflight-load-producer
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixTokensToMatch: 65536
- type: prefix-cache-affinity-filter
  parameters:
    affinityThreshold: 0.8
    maxTTFTPenaltyMs: 500
    peakPrefillThroughput: 2000
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: token-load-scorer
"""


def test_the_optimized_baseline_shape_passes_check_config(tmp_path, capsys):
    path = tmp_path / "optimized-baseline.yaml"
    path.write_text(OPTIMIZED_BASELINE)
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "    filters: prefix-cache-affinity-filter\n    scorers: token-load-scorer x1\n    picker: max-score-picker (implied)\n" in out
    assert (
        "    prefix-cache-affinity-filter: affinityThreshold=0.8, explorationProbability=0.0, maxTTFTPenaltyMs=500.0, "
        "ttftSource=prefillThroughput, peakPrefillThroughput=2000.0, prefixMatchInfoProducerName=approx-prefix-cache-producer, "
        "inFlightLoadProducerName=inflight-load-producer\n"
    ) in out
    assert "    token-load-scorer: queueThresholdTokens=4194304, inFlightLoadProducerName=inflight-load-producer\n" in out
    assert "warning" not in out


def test_the_guides_removed_in_flight_penalty_fails_check_config_with_the_replacement(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(OPTIMIZED_BASELINE.replace("maxTTFTPenaltyMs: 500", "maxTokensInFlightPenalty: 286720\n    maxTTFTPenaltyMs: 0"))
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "plugins[3].parameters.maxTokensInFlightPenalty: prefix-cache-affinity-filter: removed from llm-d" in err
    assert "(here 286720 / 2000 * 1000 = 143360)" in err
    assert "Traceback" not in err


def test_the_optimized_baseline_shape_serves_through_the_director():
    """Same-prefix requests stick to the endpoint that cached the prompt until its queued prefill costs
    more than 500 ms at 2,000 tokens/s; then the gate opens and token-load-scorer sends them elsewhere."""
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in (1, 2, 3))
    cfg = load_config(OPTIMIZED_BASELINE, "ob.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))
    director = Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler), EppMetrics())

    def send(prompt: str) -> tuple[RequestStream, str]:
        stream = RequestStream(director)
        out = send_request(stream, completion_body(prompt, stream=True))
        return stream, set_headers(out[0])["x-gateway-destination-endpoint"]

    def first_byte(stream: RequestStream) -> None:
        stream.handle(response_headers_msg(ctype="text/event-stream"))
        stream.handle(response_body_msg(b"data: [DONE]\n\n", True))

    stream, home = send(PROMPT)
    by_address = {e.address: e for e in ds.candidates()}
    assert by_address[home].in_flight_prefill_tokens == 1000  # from the pick to the first byte
    first_byte(stream)
    assert by_address[home].in_flight_prefill_tokens == 0
    # each follow-up (1,001 tokens, 15 blocks cached at home) queues its 41-token tail there: the 26th
    # finds 25 x 41 = 1,025 tokens queued, 512 ms at 2,000 tokens/s, more than the 500 ms cap
    sent = [send(PROMPT + f" q{i:02d}") for i in range(27)]
    places = [where for _, where in sent]
    assert places[:25] == [home] * 25
    assert home not in places[25:]
    assert by_address[home].in_flight_prefill_tokens == 25 * 41
    for stream, _ in sent:
        first_byte(stream)
    assert sum(e.in_flight_prefill_tokens for e in ds.candidates()) == 0


def test_a_header_naming_no_profile_is_answered_400_through_the_request_stream():
    ds = Datastore()
    ds.set_endpoints([PREFILL.spec, DECODE.spec])
    cfg = load(STAGES.format(params=""))
    director = Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler), EppMetrics())
    out = send_request(RequestStream(director), completion_body(), extra={"epp-profile": "encode"})
    imm = out[-1].immediate_response
    assert imm.status.code == 400
    assert imm.body == b"inference error: BadRequest - no scheduling profile configured for epp-profile header value 'encode'"
