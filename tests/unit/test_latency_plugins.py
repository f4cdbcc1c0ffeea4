"""llm-d's predicted-latency plugins on the online model: predicted-latency-producer's headroom,
latency-scorer's buckets and blend, slo-headroom-tier-filter's tiers, latency-slo-admitter's shedding
(HTTP 500, as llm-d), their config errors, --explain-scores, the llm-d config that lists them, and
the Director feeding the model from a request's life."""

from __future__ import annotations

from dataclasses import replace

import json
import random
import time

import msgspec
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.handlers.usage import Usage
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol import latency as feed
from extproc.requestcontrol.director import Director
from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel, LatencyPrior, LatencySettings
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.admitter import LatencySloAdmitter
from pickers.plugins.latency.producer import LatencyPrediction, PredictedLatencyProducer, slo_ms
from pickers.plugins.latency.scorer import LatencyScorer
from pickers.plugins.latency.tier_filter import SloHeadroomTierFilter
from tests.unit.test_protocol import completion_body, response_body_msg, response_headers_msg, send_request, set_headers

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
# 10,000 tokens/s, 10 ms, nothing per running request; TPOT 20 ms + 1 ms per running request
PRIOR = LatencyPrior(prefill_tokens_per_s=10_000, ttft_overhead_s=0.010, ttft_per_running_s=0.0, tpot_base_s=0.020, tpot_per_running_s=0.001)
PROMPT = "".join(f"{i:04d}" for i in range(1000))  # 1,000 tokens


def ctx() -> PluginContext:
    return PluginContext(ApproxPrefixIndex(), random.Random(0), latency=LatencyModel(LatencySettings(prior=PRIOR)))


def load(body: str, c: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + body, "t.yaml", c or ctx())


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def ep(i: int, *, queued: int = 0, in_flight: int = 0, running: int = 0, kv: float = 0.5, labels: dict[str, str] | None = None) -> Endpoint:
    e = Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000, labels or {}))
    e.in_flight_prefill_tokens, e.in_flight = queued, in_flight
    e.metrics = Metrics(running=running, kv_usage=kv, updated_at=1.0)
    return e


def req(headers: dict[str, str] | None = None, priority: int = 0) -> InferenceRequest:
    r = InferenceRequest("r", "/v1/completions", headers or {}, "completions", "m", PROMPT)
    r.priority = priority
    return r


def producer(body: str = "", c: PluginContext | None = None) -> PredictedLatencyProducer:
    cfg = load("plugins:\n- type: predicted-latency-producer\n" + body, c)
    p = cfg.plugins["predicted-latency-producer"]
    assert isinstance(p, PredictedLatencyProducer)
    return p


def pred(ttft_room: float, tpot_room: float = 0.0, dispatched: int = 1) -> LatencyPrediction:
    return LatencyPrediction(100.0, 20.0, ttft_room >= 0, tpot_room >= 0, ttft_room, tpot_room, dispatched, 0)


def with_predictions(plugin: object, cycle: CycleState, preds: dict[str, LatencyPrediction]) -> None:
    cycle.data[f"predicted-latency/{plugin.producer.name}"] = preds  # type: ignore[attr-defined]


# -- the producer -----------------------------------------------------------------------------------


def test_slo_headers_parse_as_llm_d_does():
    assert slo_ms({"x-llm-d-slo-ttft-ms": "250"}, "x-llm-d-slo-ttft-ms") == 250.0
    assert slo_ms({"x-slo-ttft-ms": "99.5"}, "x-llm-d-slo-ttft-ms") == 99.5  # the deprecated alias
    for bad in ("", "soon", "-3", "nan", "inf"):
        assert slo_ms({"x-llm-d-slo-tpot-ms": bad}, "x-llm-d-slo-tpot-ms") == 0.0


def test_the_producer_predicts_ttft_from_the_queue_and_the_uncached_prompt():
    p = producer()
    idle, busy = ep(1), ep(2, queued=9000, in_flight=3)
    preds = p.predictions(req({"x-llm-d-slo-ttft-ms": "500"}), CycleState(), [idle, busy])
    assert preds[idle.address].ttft_ms == pytest.approx(10 + 1000 / 10)  # 10 ms + 1,000 uncached tokens at 10k/s
    assert preds[busy.address].ttft_ms == pytest.approx(10 + 10_000 / 10)
    assert preds[idle.address].ttft_valid and preds[idle.address].ttft_headroom_ms == pytest.approx(390)
    assert not preds[busy.address].ttft_valid and preds[busy.address].ttft_headroom_ms == pytest.approx(-510)
    assert (preds[busy.address].dispatched, preds[busy.address].uncached_tokens) == (3, 1000)


def test_without_slo_headers_every_headroom_is_negative_and_tpot_is_neutral():
    preds = producer().predictions(req(), CycleState(), [ep(1)])
    p = next(iter(preds.values()))
    assert p.ttft_headroom_ms == pytest.approx(-p.ttft_ms) and not p.ttft_valid
    assert (p.tpot_valid, p.tpot_headroom_ms) == (True, 0.0)  # not streamingMode


def test_streaming_mode_checks_tpot_against_the_tightest_running_slo_with_the_buffer():
    p = producer("  parameters: {streamingMode: true, sloBufferFactor: 0.5}\n")
    e = ep(1, running=4)  # TPOT 20 + 4 = 24 ms
    headers = {"x-llm-d-slo-ttft-ms": "1000", "x-llm-d-slo-tpot-ms": "100"}
    got = p.predictions(req(headers), CycleState(), [e])[e.address]
    assert got.tpot_ms == pytest.approx(24) and got.tpot_headroom_ms == pytest.approx(50 - 24) and got.valid
    e.latency.add_tpot_slo(40.0)  # a running request wants 40 ms: 20 with the buffer
    got = p.predictions(req(headers), CycleState(), [e])[e.address]
    assert got.tpot_headroom_ms == pytest.approx(20 - 24) and not got.tpot_valid


def test_prefill_endpoints_have_their_tpot_neutralized():
    p = producer("  parameters: {streamingMode: true, endpointRoleLabel: llm-d.ai/role}\n")
    pre, dec = ep(1, labels={"llm-d.ai/role": "prefill"}), ep(2, labels={"llm-d.ai/role": "decode"})
    preds = p.predictions(req({"x-llm-d-slo-tpot-ms": "1"}), CycleState(), [pre, dec])
    assert (preds[pre.address].tpot_valid, preds[pre.address].tpot_headroom_ms) == (True, 0.0)
    assert not preds[dec.address].tpot_valid


def test_predict_in_produce_off_gives_no_predictions():
    p = producer("  parameters: {predictInProduce: false}\n")
    assert p.predictions(req(), CycleState(), [ep(1)]) == {}


def test_predictions_are_made_once_per_cycle():
    p, cycle, e = producer(), CycleState(), ep(1)
    first = p.predictions(req(), cycle, [e])[e.address]
    e.in_flight_prefill_tokens = 50_000
    assert p.predictions(req(), cycle, [e])[e.address] is first


def test_pre_request_charges_the_chosen_endpoints_and_tracks_the_tpot_slo():
    p = producer("  parameters: {streamingMode: true}\n")
    e, cycle, r = ep(1), CycleState(), req({"x-llm-d-slo-tpot-ms": "30"})
    p.produce(r, cycle, [e])
    result = SchedulingResult([e])
    p.pre_request(r, cycle, result)
    assert result.uncached == {e.address: 1000}
    assert result.in_flight is not None and result.in_flight[0].early_tokens == 1000  # the inflight-load charge
    assert e.latency.min_tpot_slo == 30.0
    p.pre_request(r, cycle, result)  # asked twice (several plugins): counted once
    p.response_complete(r, e, None, None)
    assert e.latency.tpot_slos == {} and e.latency.min_tpot_slo == 0.0


@pytest.mark.parametrize(
    ("params", "field", "why"),
    [
        ("{sloBufferFactor: 0}", "sloBufferFactor", "must be > 0"),
        ("{useEncoderCacheFeatures: true}", "useEncoderCacheFeatures", "no XGBoost sidecar"),
        ("{encoderCacheMatchInfoProducerName: mm}", "encoderCacheMatchInfoProducerName", "not supported"),
        ("{streamingMode: yes please}", "streamingMode", "expected true or false"),
        ("{contextTTL: forever}", "contextTTL", "expected a duration"),
        ("{predictionServerURL: x}", "predictionServerURL", "unknown parameter"),
    ],
)
def test_producer_config_errors_name_the_field(params, field, why):
    msg = error_of(f"plugins:\n- type: predicted-latency-producer\n  parameters: {params}\n")
    assert f"plugins[0].parameters.{field}" in msg and why in msg


def test_producer_parameters_llm_d_ignores_load_with_a_warning(monkeypatch):
    monkeypatch.setenv("PREDICTION_SERVER_URL", "http://localhost:8001")
    cfg = load("plugins:\n- type: predicted-latency-producer\n  parameters: {samplingMean: 50, contextTTL: 5m, useEncoderCacheFeatures: false}\n")
    text = " ".join(cfg.warnings)
    assert "samplingMean is deprecated" in text and "contextTTL has no effect" in text
    assert "PREDICTION_SERVER_URL set in the environment but not used" in text


def test_a_consumer_names_a_producer_that_is_not_one():
    msg = error_of("plugins:\n- type: queue-scorer\n- type: latency-scorer\n  parameters: {latencyPredictionInfoProducerName: queue-scorer}\n")
    assert "latencyPredictionInfoProducerName" in msg and "not a predicted-latency-producer" in msg


def test_two_producers_need_a_name():
    msg = error_of("plugins:\n- type: predicted-latency-producer\n  name: a\n- type: predicted-latency-producer\n  name: b\n"
                   "- type: latency-scorer\n")  # fmt: skip
    assert "2 predicted-latency-producer plugins (a, b); name the one this plugin reads" in msg


def test_a_consumer_without_a_producer_in_the_config_gets_llm_ds_default_one():
    cfg = load("plugins:\n- type: latency-scorer\n")
    scorer = cfg.plugins["latency-scorer"]
    assert isinstance(scorer, LatencyScorer) and scorer.implied and scorer.producer.name == "predicted-latency-producer"
    e, r, cycle = ep(1), req(), CycleState()
    scorer.score(r, cycle, [e, ep(2)])
    result = SchedulingResult([e])
    scorer.pre_request(r, cycle, result)  # told of the pick for the producer it made
    assert result.in_flight is not None and result.uncached == {e.address: 1000}


# -- latency-scorer ---------------------------------------------------------------------------------


def scorer(params: str = "") -> LatencyScorer:
    cfg = load("plugins:\n- type: predicted-latency-producer\n- type: latency-scorer\n" + (f"  parameters: {params}\n" if params else ""))
    s = cfg.plugins["latency-scorer"]
    assert isinstance(s, LatencyScorer)
    return s


def scores(s: LatencyScorer, preds: list[LatencyPrediction]) -> list[float]:
    eps = [ep(i + 1) for i in range(len(preds))]
    cycle = CycleState()
    with_predictions(s, cycle, {e.address: p for e, p in zip(eps, preds)})
    return s.score(req(), cycle, eps)


def test_least_prefers_the_endpoint_closest_to_the_slo():
    assert scores(scorer(), [pred(100), pred(300), pred(200)]) == [1.0, 0.01, 0.51]


def test_most_prefers_the_endpoint_with_the_most_headroom():
    assert scores(scorer("{headroomSelectionStrategy: most}"), [pred(100), pred(300), pred(200)]) == [0.01, 1.0, 0.51]


def test_endpoints_missing_an_slo_score_zero_when_others_meet_it():
    assert scores(scorer(), [pred(-50), pred(100), pred(200)]) == [0.0, 1.0, 0.01]


def test_all_negative_prefers_idle_endpoints():
    got = scores(scorer(), [pred(-50, dispatched=2), pred(-500, dispatched=0), pred(-900, dispatched=0)])
    assert got == [0.0, 1.0, 0.01]


def test_all_negative_and_busy_scores_the_least_severe_bucket():
    # bucket order: only TPOT missed, then only TTFT missed, then both
    got = scores(scorer(), [pred(-50, -5), pred(-10, 3), pred(40, -8)])
    assert got == [0.0, 0.0, 0.51]  # one endpoint in the bucket: no spread, 0.5 either way
    got = scores(scorer(), [pred(-50, -5), pred(-10, 3), pred(-30, 3)])
    assert got == [0.0, 1.0, 0.01]  # only TTFT missed: the smallest deficit wins (least)
    got = scores(scorer(), [pred(-50, -5), pred(-10, 3), pred(-30, 1)])
    assert got == [0.0, 0.81, 0.2]  # 0.8 x TTFT (best) + 0.2 x TPOT (worst): 1 - 0.2


def test_the_weights_blend_ttft_and_tpot_and_a_flat_dimension_gives_way():
    s = scorer("{ttftWeight: 1, tpotWeight: 1}")
    assert scores(s, [pred(100, 10), pred(300, 30)]) == [1.0, 0.01]
    assert scores(s, [pred(100, 30), pred(300, 10)]) == [0.51, 0.51]  # opposite: a tie at the middle
    assert scores(s, [pred(100, 5), pred(100, 50)]) == [1.0, 0.01]  # TTFT flat: TPOT alone decides


def test_without_slos_the_scorer_prefers_the_lowest_predicted_latency():
    s = scorer()
    fast, slow = ep(1), ep(2, queued=20_000)
    assert s.score(req(), CycleState(), [fast, slow]) == [1.0, 0.01]


def test_without_predictions_the_composite_fallback_scores_kv_queue_and_prefix():
    cfg = load("plugins:\n- type: predicted-latency-producer\n  parameters: {predictInProduce: false}\n"
               "- type: latency-scorer\n  parameters: {compositePrefixWeight: 0}\n")  # fmt: skip
    s = cfg.plugins["latency-scorer"]
    assert isinstance(s, LatencyScorer)
    a, b = ep(1, kv=0.2), ep(2, kv=0.8)
    a.metrics, b.metrics = replace(a.metrics, waiting=0), replace(b.metrics, waiting=4)
    assert s.score(req(), CycleState(), [a, b]) == [pytest.approx(0.9), pytest.approx(0.1)]


@pytest.mark.parametrize(
    ("params", "field"),
    [("{ttftWeight: -1}", "ttftWeight"), ("{headroomSelectionStrategy: best}", "headroomSelectionStrategy"),
     ("{compositeKVWeight: .inf}", "compositeKVWeight"), ("{tpotWeight: fast}", "tpotWeight")],
)  # fmt: skip
def test_scorer_config_errors_name_the_field(params, field):
    assert f"plugins[1].parameters.{field}" in error_of(f"plugins:\n- type: predicted-latency-producer\n- type: latency-scorer\n  parameters: {params}\n")


# -- slo-headroom-tier-filter -----------------------------------------------------------------------


def tier_filter(epsilon: float, c: PluginContext | None = None) -> SloHeadroomTierFilter:
    cfg = load(f"plugins:\n- type: predicted-latency-producer\n- type: slo-headroom-tier-filter\n  parameters: {{epsilonExploreNeg: {epsilon}}}\n", c)
    f = cfg.plugins["slo-headroom-tier-filter"]
    assert isinstance(f, SloHeadroomTierFilter)
    return f


def filtered(f: SloHeadroomTierFilter, preds: dict[int, LatencyPrediction | None]) -> list[int]:
    eps = {i: ep(i) for i in preds}
    cycle = CycleState()
    with_predictions(f, cycle, {eps[i].address: p for i, p in preds.items() if p is not None})
    return [int(e.name.split("-")[1]) for e in f.filter(req(), cycle, list(eps.values()))]


def test_the_tier_filter_keeps_the_endpoints_meeting_the_slos():
    assert filtered(tier_filter(0.0), {1: pred(10), 2: pred(-5), 3: pred(3, -1), 4: None, 5: pred(0, 0)}) == [1, 5]


def test_the_tier_filter_explores_the_negative_tier_with_epsilon():
    assert filtered(tier_filter(1.0), {1: pred(10), 2: pred(-5), 3: None}) == [2, 3]


def test_one_tier_or_no_predictions_keeps_every_candidate():
    f = tier_filter(0.5)
    assert filtered(f, {1: pred(-1), 2: pred(-2)}) == [1, 2]
    assert filtered(f, {1: None, 2: None}) == [1, 2]


def test_the_tier_filter_refuses_an_epsilon_outside_0_1():
    assert "epsilonExploreNeg: slo-headroom-tier-filter: must be in [0, 1], got 1.5" in error_of("plugins:\n- type: slo-headroom-tier-filter\n  parameters: {epsilonExploreNeg: 1.5}\n")


# -- latency-slo-admitter ---------------------------------------------------------------------------


def admitter() -> LatencySloAdmitter:
    cfg = load("plugins:\n- type: predicted-latency-producer\n- type: latency-slo-admitter\n")
    a = cfg.plugins["latency-slo-admitter"]
    assert isinstance(a, LatencySloAdmitter)
    return a


SLO = {"x-llm-d-slo-ttft-ms": "50"}  # below the 110 ms an idle endpoint is predicted to take


def test_the_admitter_sheds_a_sheddable_request_no_endpoint_can_serve_in_time():
    busy = [ep(1, running=3), ep(2, running=5)]
    with pytest.raises(RequestError) as e:
        admitter().admit_cycle(req(SLO, priority=-1), CycleState(), busy)
    assert e.value.kind.status == 500  # llm-d's Internal
    assert e.value.body == b"inference error: Internal - request cannot be admitted: no valid endpoint available to serve the request"


@pytest.mark.parametrize(
    ("headers", "priority", "endpoints"),
    [
        (SLO, 0, [ep(1, running=3)]),  # not sheddable
        ({}, -1, [ep(1, running=3)]),  # no SLO
        (SLO, -1, [ep(1, running=3), ep(2, running=0)]),  # an idle endpoint
        (SLO, -1, [ep(1, running=3), ep(2, running=2, kv=0.01)]),  # a cold endpoint
        ({"x-llm-d-slo-ttft-ms": "5000"}, -1, [ep(1, running=3)]),  # a valid prediction
    ],
)
def test_the_admitter_admits(headers, priority, endpoints):
    admitter().admit_cycle(req(headers, priority), CycleState(), endpoints)


def test_the_admitter_fails_open_without_predictions():
    cfg = load("plugins:\n- type: predicted-latency-producer\n  parameters: {predictInProduce: false}\n- type: latency-slo-admitter\n")
    a = cfg.plugins["latency-slo-admitter"]
    assert isinstance(a, LatencySloAdmitter)
    a.admit_cycle(req(SLO, -1), CycleState(), [ep(1, running=3)])


def test_the_admitter_runs_after_the_producers_before_the_profiles():
    cfg = load("plugins:\n- type: predicted-latency-producer\n- type: latency-slo-admitter\n- type: queue-scorer\n"
               "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: predicted-latency-producer}, "
               "{pluginRef: latency-slo-admitter}, {pluginRef: queue-scorer}]\n")  # llm-d lists them in a profile
    assert [type(p).__name__ for p in cfg.profile.plugins()] == ["QueueScorer", "MaxScorePicker"]
    s = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    with pytest.raises(RequestError):
        s.schedule(req(SLO, -1), [ep(1, running=3)])
    assert s.schedule(req(SLO, 0), [ep(1, running=3)]).endpoints[0].name == "pod-1"


# -- in the EPP -------------------------------------------------------------------------------------

LLMD_PREDICTED_LATENCY = """\
plugins:
- type: prefix-cache-scorer
- type: predicted-latency-producer
  parameters:
    streamingMode: true
- type: prefix-cache-affinity-filter
  name: strict-affinity-filter
  parameters:
    affinityThreshold: 0.99
- type: latency-scorer
- type: weighted-random-picker
- type: slo-headroom-tier-filter
- type: latency-slo-admitter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-latency-producer
  - pluginRef: strict-affinity-filter
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: latency-scorer
  - pluginRef: weighted-random-picker
"""


def serve(config: str, explain: bool = True) -> tuple[Director, Datastore, LatencyModel]:
    c = ctx()
    cfg = load(config, c)
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in (1, 2, 3))
    s = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers, explain=explain)
    return Director(ds, s, EppMetrics(), latency=c.latency), ds, c.latency


def test_llm_ds_predicted_latency_config_serves_and_feeds_the_model():
    director, ds, model = serve(LLMD_PREDICTED_LATENCY)
    stream = RequestStream(director)
    out = send_request(stream, completion_body(PROMPT, stream=True, stream_options={"include_usage": True}))
    chosen = ds.get(set_headers(out[0])["x-gateway-destination-endpoint"])
    assert chosen is not None
    scores = director.decisions[-1][5]
    assert scores is not None
    assert set(scores["predicted-latency-producer/ttft_ms"]) == {e.address for e in ds.candidates()}  # --explain-scores
    assert scores["predicted-latency-producer/ttft_ms"][chosen.address] == pytest.approx(110.0)
    resp = stream.handle(response_headers_msg(ctype="text/event-stream"))
    mutation = {h.header.key: h.header.raw_value.decode() for h in resp[0].response_headers.response.header_mutation.set_headers}
    assert mutation[feed.PREDICTED_TTFT_HEADER] == "110.0"
    stream.handle(response_body_msg(b'data: {"choices":[{"text":"a"}],"usage":null}\n\n', False))
    usage = {"prompt_tokens": 1000, "completion_tokens": 3, "total_tokens": 1003, "prompt_tokens_details": {"cached_tokens": 0}}
    stream.handle(response_body_msg(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n", True))
    view = model.view(chosen)
    assert (view["samples"], view["tpot_samples"], view["source"]) == (1, 1, "own")
    assert chosen.in_flight == 0 and chosen.in_flight_prefill_tokens == 0


def test_without_explain_no_prediction_header_is_added():
    director, ds, model = serve(LLMD_PREDICTED_LATENCY, explain=False)
    stream = RequestStream(director)
    send_request(stream, completion_body(PROMPT, stream=True))
    resp = stream.handle(response_headers_msg(ctype="text/event-stream"))
    assert not resp[0].response_headers.HasField("response")


def test_a_sheddable_request_over_its_slo_gets_llm_ds_500():
    director, ds, model = serve(LLMD_PREDICTED_LATENCY)
    for e in ds.candidates():
        e.metrics = Metrics(running=4, kv_usage=0.5, updated_at=time.monotonic())
    director.objectives.priority = lambda name: -1  # type: ignore[method-assign]
    out = send_request(RequestStream(director), completion_body(PROMPT), extra={"x-llm-d-slo-ttft-ms": "20"})
    imm = out[-1].immediate_response
    assert imm.status.code == 500 and b"no valid endpoint available" in imm.body


# -- request control's record of a pick and its feed --------------------------------------------


def usage(prompt: int, completion: int, cached: int | None) -> Usage:
    details = "" if cached is None else f',"prompt_tokens_details":{{"cached_tokens":{cached}}}'
    return msgspec.json.decode(f'{{"prompt_tokens":{prompt},"completion_tokens":{completion}{details}}}'.encode(), type=Usage)


def test_the_fit_learns_from_the_servers_own_cached_count():
    model, e = LatencyModel(LatencySettings(prior=PRIOR)), ep(1, queued=500)
    r = req()
    rec = feed.on_pick(model, r, SchedulingResult([e], uncached={e.address: 1000}), now=10.0, predicted=True)
    assert (rec.queued, rec.uncached, rec.transfer) == (500, 1000, 0)
    assert rec.predicted_ttft == pytest.approx(0.010 + 1500 / 10_000)
    rec.first_byte_at = 10.3
    feed.on_end(model, rec, status=200, streaming=True, aborted=False, usage=usage(1000, 11, 400), now=11.3)
    assert e.latency.last_ttft == (pytest.approx(rec.predicted_ttft), pytest.approx(0.3))
    assert model.view(e)["tpot_samples"] == 1  # (11.3 - 10.3) / 10 tokens
    fit = e.latency.ttft
    assert fit is not None and fit.su == pytest.approx(fit.s1 * (500 + 600))  # 1,000 prompt - 400 cached


def test_the_fit_counts_the_picks_state_not_the_endpoints_at_the_end():
    model, e = LatencyModel(LatencySettings(prior=PRIOR)), ep(1, queued=500)
    rec = feed.on_pick(model, req(), SchedulingResult([e], uncached={e.address: 1000}), now=0.0)
    assert rec.predicted_ttft is None  # not asked (no --explain-scores)
    e.in_flight_prefill_tokens = 90_000  # the queue grew meanwhile: the record keeps the pick's
    rec.first_byte_at = 0.3
    feed.on_end(model, rec, status=200, streaming=True, aborted=False, usage=None, now=0.3)
    # the running error compares the fit's prediction for the pick's counts (the prior's here)
    assert e.latency.last_ttft == (pytest.approx(0.010 + 1500 / 10_000), pytest.approx(0.3))


def test_a_disaggregated_request_teaches_the_prefill_endpoint():
    model = LatencyModel(LatencySettings(prior=PRIOR))
    d, p = ep(1), ep(2, queued=2000)
    result = SchedulingResult([d], uncached={d.address: 1000, p.address: 800}, profile_results={"decode": [d], "prefill": [p]})
    rec = feed.on_pick(model, req(), result, now=0.0, predicted=True)
    assert (rec.prefiller, rec.decoder, rec.uncached, rec.transfer) == (p, d, 800, 1000)
    assert rec.predicted_ttft == pytest.approx(model.ttft(p, 800) + model.kv_transfer(1000) + model.tpot(d))
    rec.first_byte_at = 0.5
    feed.on_end(model, rec, status=200, streaming=True, aborted=False, usage=usage(1000, 1, 1000), now=0.5)
    assert model.view(p)["samples"] == 1 and model.view(d)["samples"] == 0
    assert p.latency.last_ttft is not None
    assert p.latency.last_ttft[1] == pytest.approx(0.5 - model.kv_transfer(1000) - model.tpot(d, batch=0))


@pytest.mark.parametrize(
    ("status", "streaming", "aborted", "first", "u"),
    [(503, True, False, 1.0, None), (200, True, True, 1.0, None), (200, True, False, None, None),
     (200, False, False, 1.0, None), (200, False, False, 1.0, (100, 20, 0))],  # no usage; a TPOT not yet fitted
)  # fmt: skip
def test_responses_that_cannot_teach_are_skipped(status, streaming, aborted, first, u):
    model, e = LatencyModel(), ep(1)
    rec = feed.on_pick(model, req(), SchedulingResult([e]), now=0.0)
    rec.first_byte_at = first
    feed.on_end(model, rec, status=status, streaming=streaming, aborted=aborted, usage=usage(*u) if u else None, now=2.0)
    assert model.view(e)["samples"] == 0 and e.latency.skipped == 1


def test_a_one_token_unstreamed_response_is_its_ttft():
    model, e = LatencyModel(), ep(1)
    rec = feed.on_pick(model, req(), SchedulingResult([e]), now=0.0)
    rec.first_byte_at = 0.2
    feed.on_end(model, rec, status=200, streaming=False, aborted=False, usage=usage(1000, 1, None), now=0.2)
    assert e.latency.last_ttft is not None and e.latency.last_ttft[1] == pytest.approx(0.2)


def test_the_uncached_estimate_comes_from_whichever_plugin_counted_it():
    from pickers.framework.types import InFlightCharge

    e, other = ep(1), ep(2)
    r = req()
    assert feed.uncached_on(SchedulingResult([e], uncached={e.address: 7}), e, r) == 7
    assert feed.uncached_on(SchedulingResult([e], in_flight=[InFlightCharge(e, early_tokens=9)]), e, r) == 9
    assert feed.uncached_on(SchedulingResult([e], prefill_tokens=11), e, r) == 11
    assert feed.uncached_on(SchedulingResult([e], prefill_tokens=11), other, r) == 1000  # unknown: the whole prompt


# -- visibility ---------------------------------------------------------------------------------


async def test_debug_endpoints_and_epp_status_show_the_fitted_values():
    import asyncio
    import io

    from aiohttp.test_utils import TestClient, TestServer

    from extproc.cli.status import show_status
    from extproc.server.admin import admin_app

    director, ds, model = serve(LLMD_PREDICTED_LATENCY)
    first = ds.candidates()[0]
    for i in range(12):
        model.observe_ttft(first, 1000 + 100 * i, 0, 0.5 + 0.2 * i / 10)
        model.observe_tpot(first, 2, 0.07)
    async with TestClient(TestServer(admin_app(ds, None, director, {}, latency=model))) as client:
        eps = (await (await client.get("/debug/endpoints")).json())["endpoints"]
        out = io.StringIO()
        rc = await asyncio.to_thread(show_status, str(client.make_url("")).rstrip("/"), out=out)
    lat = {e["name"]: e["latency"] for e in eps}
    assert lat["pod-1"]["source"] == "own" and lat["pod-1"]["samples"] == 12 and lat["pod-1"]["tpot_base_ms"] > 20
    assert lat["pod-2"]["source"] == "prior" and lat["pod-2"]["prefill_tokens_per_s"] == pytest.approx(10_000)
    text = out.getvalue()
    assert rc == 0 and "latency model (FIT" in text and "PREFILL TOK/S" in text
    row = next(line for line in text.splitlines() if line.startswith("pod-1") and " own " in line)
    assert "12/12" in row
