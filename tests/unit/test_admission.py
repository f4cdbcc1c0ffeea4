"""Admission before scheduling: llm-d's probabilistic-admitter (its formula, refusals through the
request stream) and its legacy admission detector (flowControl.saturationDetector with the gate off)."""

from __future__ import annotations

import random
import time

import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from extproc.requestcontrol.objectives import ObjectiveStore
from extproc.requestcontrol.saturation import SaturationDetector
from pickers.config.loader import load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.plugins.base import PluginContext
from pickers.plugins.flowcontrol.admitter import ProbabilisticAdmitter
from tests.unit.test_objectives_rewrite import dropped_reason, immediate
from tests.unit.test_protocol import ADDRS, completion_body, send_request

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
ADMITTER = HEAD + "plugins:\n- type: probabilistic-admitter\n  parameters: {params}\n- type: random-picker\n"


def ep(waiting: int, kv: float, scraped: bool = True) -> Endpoint:
    return Endpoint(EndpointSpec("p", "10.0.0.1", 8000), Metrics(waiting=waiting, kv_usage=kv, updated_at=1.0 if scraped else 0.0))


def sheddable() -> InferenceRequest:
    r = InferenceRequest("r", "/v1/completions", {}, "completions", "m", "hi")
    r.priority = -1
    return r


class Draw(random.Random):
    """A random source that returns one fixed draw."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def admitter(draw: float, params: str = "{}") -> ProbabilisticAdmitter:
    cfg = load_config(ADMITTER.format(params=params), "a.yaml", PluginContext(rng=Draw(draw)))
    plugin = cfg.plugins["probabilistic-admitter"]
    assert isinstance(plugin, ProbabilisticAdmitter)
    return plugin


def test_saturation_is_the_mean_of_the_worse_ratio_and_never_scraped_counts_full():
    a = admitter(0.5)
    assert a.saturation([ep(5, 0.0), ep(0, 0.4)]) == pytest.approx((1.0 + 0.5) / 2)
    assert a.saturation([ep(0, 0.0, scraped=False), ep(0, 0.0)]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("waiting", "draw", "refused"),
    [
        (0, 0.0, False),  # saturation 0: probability 0, nothing is refused
        (1, 0.01, True),  # 0.2^5 * 300 = 0.096
        (1, 0.1, False),
        (2, 0.99, True),  # 0.4^5 * 300 > 1: every sheddable request
    ],
)
def test_sheddable_requests_are_refused_with_probability_min_of_sat_power_times_k_and_1(waiting, draw, refused):
    a = admitter(draw)
    if refused:
        with pytest.raises(RequestError) as e:
            a.admit_request(sheddable(), [ep(waiting, 0.0)])
        assert e.value.kind.status == 429 and "probabilistic-admitter: rejected" in str(e.value)
    else:
        a.admit_request(sheddable(), [ep(waiting, 0.0)])


def test_critical_and_standard_requests_and_an_empty_pool_are_always_admitted():
    a = admitter(0.0)
    r = sheddable()
    r.priority = 0
    a.admit_request(r, [ep(100, 1.0)])
    a.admit_request(sheddable(), [])


def test_parameters_are_llm_ds_and_checked():
    a = admitter(0.5, "{queueDepthThreshold: 10, kvCacheUtilThreshold: 0.5, power: 2, k: 4}")
    assert (a.queue_depth, a.kv_cache_util, a.power, a.k) == (10, 0.5, 2.0, 4.0)
    for bad, field in (("{power: 0}", "power"), ("{k: -1}", "k"), ("{queueDepthThreshold: 0}", "queueDepthThreshold"),
                       ("{kvCacheUtilThreshold: 0}", "kvCacheUtilThreshold")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"plugins\[0\]\.parameters\.{field}: probabilistic-admitter"):
            load_config(ADMITTER.format(params=bad), "a.yaml")


def director_for(text: str, waiting: int = 0, draw: float = 0.0) -> Director:
    cfg = load_config(text, "a.yaml", PluginContext(rng=Draw(draw)))
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in ADDRS)
    for e in ds.candidates():
        ds.update_metrics(e.address, Metrics(waiting=waiting, updated_at=time.monotonic()))
    scheduler = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    return Director(ds, scheduler, EppMetrics(), objectives=ObjectiveStore({"batch": -1}),
                    saturation=SaturationDetector(ds, plugin=cfg.admission_detector))  # fmt: skip


def test_the_admitter_refuses_through_the_request_stream_before_scheduling():
    director = director_for(ADMITTER.format(params="{}"), waiting=3, draw=0.5)  # 0.6^5*300 > 1
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    imm = immediate(out)
    assert imm is not None and imm.status.code == 429 and dropped_reason(imm) == "rejected-saturated"
    assert director.datastore.total_in_flight() == 0
    assert director.metrics.admissions == {("probabilistic-admitter", "refused"): 1}  # its rule is its name
    assert director.decisions[-1][6] == ("probabilistic-admitter",)
    out = send_request(RequestStream(director), completion_body())  # priority 0: admitted
    assert immediate(out) is None


def test_the_legacy_admission_detector_decides_when_sheddable_requests_are_refused():
    text = (HEAD + "plugins:\n- type: random-picker\n- type: concurrency-detector\n  name: cd\n"
            "  parameters: {maxConcurrency: 1}\nflowControl: {saturationDetector: {pluginRef: cd}}\n")  # fmt: skip
    director = director_for(text)
    busy = director.datastore.candidates()
    for e in busy:
        e.in_flight = 1  # every endpoint at its concurrency limit; the scraped queue is empty
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    assert immediate(out) is not None and immediate(out).status.code == 429
    for e in busy:
        e.in_flight = 0
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    assert immediate(out) is None
