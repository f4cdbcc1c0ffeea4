"""lmetric-scorer (llm-d-router PR #2351): cost = uncached prompt tokens x (requests in flight + 1), min-max
to a score; on the approximate match and on a precise producer's; its bindings and its config errors."""

from __future__ import annotations

import random

import pytest

from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.load.lmetric import LMetricScorer
from pickers.plugins.scorer.affinity.prefix import prefix_match

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PROMPT = "x" * 2560  # 10 blocks of 64 tokens (256 characters) in the default approximate match


def ctx() -> PluginContext:
    return PluginContext(ApproxPrefixIndex(), random.Random(0))


def load(body: str, c: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + body, "t.yaml", c or ctx())


def ep(i: int, in_flight: int = 0) -> Endpoint:
    e = Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000, {}))
    e.in_flight = in_flight
    e.metrics = Metrics(updated_at=1.0)
    return e


def req(prompt: str = PROMPT) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, "completions", "m", prompt)


def scorer(body: str = "", c: PluginContext | None = None) -> LMetricScorer:
    s = load("plugins:\n- type: lmetric-scorer\n" + body, c).plugins["lmetric-scorer"]
    assert isinstance(s, LMetricScorer)
    return s


def cache(c: PluginContext, s: LMetricScorer, endpoint: Endpoint, blocks: int) -> None:
    src = s.source
    pm = prefix_match(req(), CycleState(), c.prefix_index, src.block_chars, src.max_blocks)
    c.prefix_index.record(endpoint.address, pm.hashes[:blocks])


def test_the_cost_is_uncached_tokens_times_the_batch_joined():
    c = ctx()
    s = scorer(c=c)
    holder, half, cold = ep(1, in_flight=3), ep(2, in_flight=1), ep(3)
    cache(c, s, holder, 10)
    cache(c, s, half, 5)
    # (10 - 10) x 64 x 4 = 0; (10 - 5) x 64 x 2 = 640; 10 x 64 x 1 = 640
    assert s.costs(req(), CycleState(), [holder, half, cold]) == [0.0, 640.0, 640.0]
    assert list(s.score(req(), CycleState(), [holder, half, cold])) == [1.0, 0.0, 0.0]


def test_scores_are_min_max_of_the_costs():
    c = ctx()
    s = scorer(c=c)
    a, b, d = ep(1), ep(2, in_flight=1), ep(3, in_flight=3)  # none cached: 640, 1280, 2560
    assert list(s.score(req(), CycleState(), [a, b, d])) == [1.0, pytest.approx(2 / 3), 0.0]


def test_equal_costs_score_one_everywhere_and_a_prompt_shorter_than_a_block_scores_zero():
    s = scorer()
    assert list(s.score(req(), CycleState(), [ep(1), ep(2)])) == [1.0, 1.0]
    assert list(s.score(req("short"), CycleState(), [ep(1), ep(2, in_flight=5)])) == [0.0, 0.0]


class FakePrecise:
    """A precise-prefix-cache-producer's match: (blocks held, prompt blocks, tokens a block) per address."""

    type = "precise-prefix-cache-producer"
    name = "precise"

    def __init__(self, matches: dict[str, tuple[int, int, int]]) -> None:
        self.matches = matches

    def prefix_matches(self, request, cycle, endpoints):  # the protocol's shape
        return self.matches


def test_on_a_precise_match_its_block_size_counts_and_an_endpoint_it_lacks_scores_zero():
    s = LMetricScorer(ctx())
    a, b, missing = ep(1, in_flight=2), ep(2), ep(3)
    precise = FakePrecise({a.address: (2, 4, 16), b.address: (0, 4, 16)})
    s.prefix_producer_name = "precise"
    s.bind_config({"precise": precise}, {}, None)
    assert s.precise is precise
    assert s.costs(req(), CycleState(), [a, b, missing]) == [2 * 16 * 3.0, 4 * 16 * 1.0, None]
    assert list(s.score(req(), CycleState(), [a, b, missing])) == [0.0, 1.0, 0.0]


def test_after_the_pick_the_bound_inflight_producer_charges_the_chosen_endpoint():
    cfg = load(
        "plugins:\n- type: inflight-load-producer\n  name: load\n- type: lmetric-scorer\n  parameters: {inFlightLoadProducerName: load}\n"
    )
    s = cfg.plugins["lmetric-scorer"]
    assert isinstance(s, LMetricScorer) and s.load is cfg.plugins["load"]
    assert cfg.plugin_parameters["lmetric-scorer"]["inFlightLoadProducerName"] == "load"
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    result = sched.schedule(req(), [ep(1), ep(2, in_flight=2)])
    assert result.endpoints[0].name == "pod-1"
    assert result.in_flight is not None and result.in_flight[0].early_tokens == 640  # the prompt's uncached tokens


def test_without_producers_in_the_config_it_uses_llm_ds_defaults():
    s = scorer()
    assert s.precise is None and s.source.block_chars == 256
    assert s.load.name == "inflight-load-producer"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{inFlightLoadProducerName: nope}", "inFlightLoadProducerName: lmetric-scorer: 'nope': no plugin"),
        ("{prefixMatchInfoProducerName: nope}", "prefixMatchInfoProducerName"),
        ("{weight: 2}", "weight: lmetric-scorer: unknown parameter"),
    ],
)
def test_lmetric_parameters_are_checked(params, message):
    with pytest.raises(ConfigError) as e:
        load(f"plugins:\n- type: lmetric-scorer\n  parameters: {params}\n")
    assert message in str(e.value)


def test_the_result_charges_are_planned_once_however_many_plugins_ask():
    cfg = load("plugins:\n- type: inflight-load-producer\n- type: lmetric-scorer\n- type: token-load-scorer\n")
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    result = sched.schedule(req(), [ep(1)])
    assert isinstance(result, SchedulingResult) and result.in_flight is not None and len(result.in_flight) == 1
