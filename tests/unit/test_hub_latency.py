"""llm-d's hub latency pair (llm-d-router PR #2371): latency-observer-producer-hub's TTFT windows,
anchors and floor, and latency-observation-scorer-hub's curve, states and exploration; their config
checks (Alpha, dataLayer.sources), and the first response chunk reaching the observer through the
request stream."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.observer import LatencyObserverProducer, TTFTPercentiles, band_inflight, percentile
from pickers.plugins.latency.observation_scorer import LatencyObservationScorer, predict
from tests.unit.test_protocol import completion_body, response_body_msg, response_headers_msg, send_request, set_headers

CONFIG = Path(__file__).parent / "configs" / "hub-latency.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PAIR = (
    "plugins:\n- type: latency-observer-producer-hub\n  name: obs\n  parameters: {{{params}}}\n"
    "- type: latency-observation-scorer-hub\n  name: ttft\n  parameters: {{ttftPercentilesProducerName: obs{scorer}}}\n"
    "dataLayer:\n  sources:\n  - pluginRef: obs\n"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def load(body: str, *, allow: bool = True) -> EndpointPickerConfig:
    return load_config(HEADER + body, "t.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)), allow_experimental=allow)


def pair(params: str = "minRequests: 3", scorer: str = "", clock: Clock | None = None) -> tuple[LatencyObserverProducer, LatencyObservationScorer, EndpointPickerConfig]:
    cfg = load(PAIR.format(params=params, scorer=scorer))
    obs, s = cfg.plugins["obs"], cfg.plugins["ttft"]
    assert isinstance(obs, LatencyObserverProducer) and isinstance(s, LatencyObservationScorer)
    obs.clock = clock or Clock()
    return obs, s, cfg


def ep(i: int, in_flight: int = 0) -> Endpoint:
    e = Endpoint(EndpointSpec(f"cluster-{i}", f"10.0.0.{i}", 8000, {}))
    e.in_flight = in_flight
    e.metrics = Metrics(updated_at=1.0)
    return e


def req() -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, "completions", "m", "hello")


# -- the observer ------------------------------------------------------------------------------------


def test_percentiles_interpolate_and_bands_average_the_in_flight_counts():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0
    assert percentile([1.0, 2.0], 0.5) == 1.5
    assert percentile([], 0.5) == 0.0
    window = [(float(v), v, 0.0) for v in range(11)]  # in flight 0..10, by TTFT
    assert band_inflight(window, 0.5) == pytest.approx((4 + 5 + 6) / 3)  # indices 4..6 (int(0.4*10), int(0.6*10))


def test_a_streamed_responses_first_chunk_is_a_ttft_at_the_in_flight_count_before_the_pick():
    clock = Clock()
    obs, _, cfg = pair(clock=clock)
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    a = ep(1, in_flight=4)
    r = req()
    sched.schedule(r, [a])
    clock.now += 0.25
    sched.response_started(r, a, False)
    assert list(obs._windows[a.address].ring) == [(pytest.approx(0.25), 4, clock.now)]
    single = req()
    sched.schedule(single, [a])
    clock.now += 2.0
    sched.response_started(single, a, True)  # its first chunk is its last: end to end, not a TTFT
    assert len(obs._windows[a.address].ring) == 1


def test_an_endpoint_is_cold_until_min_requests_then_floors_at_the_windows_p10():
    clock = Clock()
    obs, _, _ = pair("minRequests: 3, intervalDuration: 1s", clock=clock)
    for ttft in (0.2, 0.4):
        obs.record("a", ttft, 1, clock.now)
    assert obs.snapshot("a").floor() == 0.0
    clock.now += 1
    obs.record("a", 0.6, 3, clock.now)
    snap = obs.snapshot("a")
    assert snap.floor() == pytest.approx(0.24)  # P10 of 0.2, 0.4, 0.6
    assert (snap.low_load_ttft, snap.typical_load_ttft, snap.recent_request_count) == (pytest.approx(0.3), pytest.approx(0.4), 3)


def test_snapshots_are_recomputed_at_most_every_interval():
    clock = Clock()
    obs, _, _ = pair("minRequests: 1, intervalDuration: 10s", clock=clock)
    obs.record("a", 0.5, 1, clock.now)
    first = obs.snapshot("a")
    obs.record("a", 0.1, 1, clock.now)
    clock.now += 5
    assert obs.snapshot("a") is first
    clock.now += 5
    assert obs.snapshot("a").recent_request_count == 2


def test_the_short_window_keeps_the_newest_max_requests_within_max_observation_age():
    clock = Clock()
    obs, _, _ = pair("minRequests: 1, maxRequests: 3, windowSize: 10, maxObservationAge: 1m", clock=clock)
    obs.record("a", 9.0, 1, clock.now - 120)  # too old
    for ttft in (1.0, 2.0, 3.0, 4.0):
        obs.record("a", ttft, 1, clock.now)
    snap = obs.snapshot("a")
    assert snap.recent_request_count == 3 and snap.typical_load_ttft == 3.0  # 2, 3, 4


def test_the_floor_is_a_low_percentile_of_closed_buckets_whose_slowest_are_dropped():
    clock = Clock()
    obs, _, _ = pair("minRequests: 1, bucketDuration: 10s, bucketHistorySize: 2, intervalDuration: 1s", clock=clock)
    obs.snapshot("a")  # opens the first bucket
    for p10 in (0.5, 0.1, 0.3):  # one observation a bucket: its P10 is itself
        clock.now += 11
        obs.record("a", p10, 1, clock.now)
        obs.snapshot("a")
    st = obs._windows["a"]
    assert st.bucket_p10s == [0.1, 0.3]  # 0.5, the slowest, went when the third came
    assert st.floor == pytest.approx(0.12)


def test_an_observer_not_listed_in_data_layer_sources_publishes_nothing():
    cfg = load("plugins:\n- type: latency-observer-producer-hub\n- type: latency-observation-scorer-hub\n")
    obs = cfg.plugins["latency-observer-producer-hub"]
    assert isinstance(obs, LatencyObserverProducer) and not obs.dispatched
    obs.record("a", 0.2, 1, obs.clock())
    assert obs.snapshot("a") == TTFTPercentiles()
    assert any("is not listed in dataLayer.sources: it publishes nothing" in w for w in cfg.warnings)


def test_an_endpoint_that_leaves_takes_its_observations():
    obs, _, _ = pair()
    obs.record("a", 0.2, 1, 0.0)
    obs.remove_endpoint("a")
    assert "a" not in obs._windows


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("maxRequests: 600, windowSize: 500", "maxRequests: latency-observer-producer-hub: (600) must be <= windowSize (500)"),
        ("lowPercentile: 50, typicalPercentile: 50", "0 < lowPercentile (50) < typicalPercentile (50) < 100"),
        ("bucketHistorySize: 1", "bucketHistorySize: latency-observer-producer-hub: must be >= 2, got 1"),
        ("intervalDuration: 0s", "intervalDuration: latency-observer-producer-hub: must be > 0"),
        ("maxObservationAge: soon", "maxObservationAge: latency-observer-producer-hub: expected a duration"),
        ("minRequests: 0", "minRequests: latency-observer-producer-hub: must be > 0, got 0"),
        ("windowSize: 1.5", "windowSize: latency-observer-producer-hub: expected an integer"),
    ],
)
def test_observer_parameters_are_checked_as_llm_d_checks_them(params, message):
    with pytest.raises(ConfigError) as e:
        load(PAIR.format(params=params, scorer=""))
    assert message in str(e.value)


def test_an_observer_takes_no_extractors_in_data_layer_sources():
    body = PAIR.format(params="", scorer="") + "    extractors: [{pluginRef: ttft}]\n"
    with pytest.raises(ConfigError) as e:
        load(body)
    assert "dataLayer.sources[0].extractors: latency-observer-producer-hub takes no extractors" in str(e.value)


# -- the scorer --------------------------------------------------------------------------------------

ANCHORS = TTFTPercentiles(
    floor_ttft=0.1, low_load_ttft=0.2, typical_load_ttft=0.6, inflight_at_low_load=2, inflight_at_typical_load=6,
    recent_request_count=10, observations=10, calibration_threshold=3,
)  # fmt: skip


def test_the_curve_runs_floor_to_low_load_then_low_to_typical_load():
    assert predict(ANCHORS, 0.1, 0, 2.0) == pytest.approx(0.1)
    assert predict(ANCHORS, 0.1, 1, 2.0) == pytest.approx(0.15)  # A->B
    assert predict(ANCHORS, 0.1, 4, 2.0) == pytest.approx(0.4)  # B->C
    assert predict(ANCHORS, 0.1, 10, 2.0) == pytest.approx(1.0)  # past C
    # B too close to C in load: the chord A->C, slope (0.6 - 0.1) / 6
    assert predict(ANCHORS, 0.1, 3, 5.0) == pytest.approx(0.1 + 3 * 0.5 / 6)
    inverted = TTFTPercentiles(floor_ttft=0.3, low_load_ttft=0.2, typical_load_ttft=0.25, inflight_at_low_load=1, inflight_at_typical_load=6)
    assert predict(inverted, 0.3, 2, 2.0) == pytest.approx(0.3)  # never below the floor


def publish(obs: LatencyObserverProducer, address: str, anchors: TTFTPercentiles) -> None:
    st = obs._state(address)
    st.published, st.flushed_at = anchors, obs.clock()


def test_scores_are_min_max_of_the_predicted_ttft_at_the_load_now():
    obs, s, _ = pair(scorer=", explorationRate: 0")
    a, b, c = ep(1, in_flight=0), ep(2, in_flight=4), ep(3, in_flight=10)  # 0.1, 0.4, 1.0 s
    for e in (a, b, c):
        publish(obs, e.address, ANCHORS)
    assert list(s.score(req(), None, [a, b, c])) == [1.0, pytest.approx(2 / 3), 0.0]  # type: ignore[arg-type]


def test_cold_endpoints_are_seeded_at_the_best_prediction_and_all_cold_score_one():
    obs, s, _ = pair(scorer=", explorationRate: 0")
    warm, busy, cold = ep(1, in_flight=4), ep(2, in_flight=10), ep(3)
    publish(obs, warm.address, ANCHORS)
    publish(obs, busy.address, ANCHORS)
    assert list(s.score(req(), None, [warm, busy, cold])) == [1.0, 0.0, 1.0]  # type: ignore[arg-type]
    assert list(s.score(req(), None, [ep(4), ep(5)])) == [1.0, 1.0]  # type: ignore[arg-type]


def test_an_uncalibrated_endpoint_is_predicted_at_its_floor():
    obs, s, _ = pair(scorer=", explorationRate: 0")
    seed = TTFTPercentiles(window_floor_ttft=0.3, recent_request_count=2, observations=5, calibration_threshold=3)
    trusted, seeded = ep(1, in_flight=10), ep(2, in_flight=50)  # 1.0 s on the curve; 0.3 s, load unknown to it
    publish(obs, trusted.address, ANCHORS)
    publish(obs, seeded.address, seed)
    assert s.predictions([trusted, seeded]) == [(pytest.approx(1.0), True, True), (pytest.approx(0.3), False, True)]


def test_exploration_probes_untrusted_endpoints_and_otherwise_sidelines_them():
    obs, s, _ = pair(scorer=", explorationRate: 1")
    trusted, cold = ep(1), ep(2)
    publish(obs, trusted.address, ANCHORS)
    assert list(s.score(req(), None, [trusted, cold])) == [1.0, 1.0]  # type: ignore[arg-type]
    obs, s, _ = pair(scorer=", explorationRate: 0.000001")
    publish(obs, trusted.address, ANCHORS)
    assert list(s.score(req(), None, [trusted, cold])) == [1.0, 0.0]  # type: ignore[arg-type]


def test_predictions_round_to_the_step():
    obs, s, _ = pair(scorer=", explorationRate: 0, roundTTFTStep: 0.25")
    a, b = ep(1, in_flight=1), ep(2, in_flight=0)  # 0.15 and 0.1 s: both 0.25 (Go rounds half away from zero)
    for e in (a, b):
        publish(obs, e.address, ANCHORS)
    assert [p for p, _, _ in s.predictions([a, b])] == [0.25, 0.0]
    assert list(s.score(req(), None, [a, b])) == [0.0, 1.0]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (", explorationRate: 2", "explorationRate: latency-observation-scorer-hub: must be in [0, 1], got 2"),
        (", minInflightGap: 0", "minInflightGap: latency-observation-scorer-hub: must be > 0, got 0"),
        (", roundTTFTStep: -1", "roundTTFTStep: latency-observation-scorer-hub: must be >= 0, got -1"),
        (", inFlightLoadProducerName: nope", "inFlightLoadProducerName: latency-observation-scorer-hub: 'nope': no plugin"),
    ],
)
def test_scorer_parameters_are_checked(params, message):
    with pytest.raises(ConfigError) as e:
        load(PAIR.format(params="", scorer=params))
    assert message in str(e.value)


def test_a_scorer_without_an_observer_loads_with_a_warning():
    cfg = load("plugins:\n- type: latency-observation-scorer-hub\n")
    assert any("no latency-observer-producer-hub in the config" in w for w in cfg.warnings)


def test_the_pair_is_alpha_as_in_llm_d():
    with pytest.raises(ConfigError) as e:
        load(PAIR.format(params="", scorer=""), allow=False)
    assert "has Alpha stability in llm-d, and --allow-experimental-plugins is not set" in str(e.value)


# -- through the request stream, and our config in the guide's shape ------------------------------------


def test_the_first_response_chunk_reaches_the_observer_through_the_director():
    cfg = load(PAIR.format(params="minRequests: 1", scorer=""))
    obs = cfg.plugins["obs"]
    assert isinstance(obs, LatencyObserverProducer)
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("cluster-1", "10.0.0.1", 8000)])
    director = Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), EppMetrics())
    stream = RequestStream(director)
    out = send_request(stream, completion_body("hello", stream=True))
    address = set_headers(out[0])["x-gateway-destination-endpoint"]
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"choices": []}\n\n', False))
    stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
    assert obs._windows[address].observations == 1
    unstreamed = RequestStream(director)
    send_request(unstreamed, completion_body("hello"))
    unstreamed.handle(response_headers_msg())
    unstreamed.handle(response_body_msg(b'{"choices": []}', True))
    assert obs._windows[address].observations == 1  # one chunk, end to end: no TTFT


def test_the_hub_latency_shape_checks_with_the_experimental_flag(capsys):
    assert cli.main(["check-config", "--allow-experimental-plugins", str(CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "observed TTFT published by: ttft-observer" in out
    warnings = [line for line in out.splitlines() if line.strip().startswith("warning:")]
    # llm-d injects its default metrics source there too, which reads a peer cluster as a model server
    assert len(warnings) == 1 and "multicluster-file-discovery lists peer clusters" in warnings[0]
