"""data-parallel-balance-scorer: what a request costs its lockstep DP group, as the formula says."""

from __future__ import annotations

import random

import pytest

from pickers.config.loader import load_config
from pickers.config.registry import create_plugin
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import PluginContext


def rank(group: str, r: int, in_flight: int = 0, prefill: int = 0, pod: str = "") -> Endpoint:
    host = f"10.0.{abs(hash(group or pod)) % 200}.1"
    spec = EndpointSpec(f"{group or pod}-rank-{r}", host, 8000 + r, rank=r, dp_group=group)
    e = Endpoint(spec)
    e.in_flight = in_flight
    e.in_flight_prefill_tokens = prefill
    return e


def req(prompt_tokens: int) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, "completions", "m", "x" * (4 * prompt_tokens))


def scorer(ctx: PluginContext | None = None, **parameters):
    return create_plugin("data-parallel-balance-scorer", "dp", parameters, ctx or PluginContext(rng=random.Random(0)))


def score(endpoints, request=None, **parameters) -> list[float]:
    return scorer(**parameters).score(request or req(100), CycleState(), endpoints)


def test_a_rank_below_its_groups_busiest_takes_a_request_for_free():
    # group of 4: the busiest has 3 in flight; the others can take one more without lengthening the step
    eps = [rank("g", 0, 3), rank("g", 1, 2), rank("g", 2, 2), rank("g", 3, 0)]
    s = score(eps, prefill=False)
    assert s[1:] == [1.0, 1.0, 1.0]
    # one more on the busiest: 4 ranks x 256 tokens' worth over a scale of 4 x 256
    assert s[0] == 0.0


def test_an_even_group_costs_the_same_everywhere():
    eps = [rank("g", r, 2) for r in range(4)]
    s = score(eps, prefill=False)
    assert len(set(s)) == 1 and s[0] < 1.0


def test_a_prefill_longer_than_the_groups_longest_costs_the_difference():
    # rank 0 already prefills 1000 tokens: a 100-token prompt on rank 1 overlaps it (free); on rank 0 it
    # comes on top (100 tokens beyond the max)
    eps = [rank("g", 0, 1, prefill=1000), rank("g", 1, 1)]
    s = score(eps, req(100), requestTokens=256)
    scale = 2 * (256 + 100)
    assert s[1] == pytest.approx(1.0 - 2 * 256 / scale)  # one more sequence at the group's max of 1
    assert s[0] == pytest.approx(1.0 - 2 * (256 + 100) / scale)


def test_cached_tokens_do_not_count_as_prefill():
    ctx = PluginContext(rng=random.Random(0))
    eps = [rank("g", 0), rank("g", 1)]
    r = req(2000)
    # rank 0 computed this prompt before: the approximate index says it holds it
    from pickers.plugins.scorer.affinity.prefix import prefix_match

    producer = scorer(ctx).producer
    m = prefix_match(r, CycleState(), ctx.prefix_index, producer.source.block_chars, producer.source.max_blocks)
    ctx.prefix_index.record(eps[0].address, m.hashes, 10_000)
    s = scorer(ctx).score(r, CycleState(), eps)
    assert s[0] > s[1]


def test_groups_are_scored_apart():
    # group a's busiest has 5; group b is idle: an idle rank in either costs nothing more than its group's max
    eps = [rank("a", 0, 5), rank("a", 1, 0), rank("b", 0, 0), rank("b", 1, 0)]
    s = score(eps, prefill=False)
    assert s[1] == 1.0  # below a's max of 5
    assert s[0] == 0.0  # a's busiest
    assert s[2] == s[3] == 0.0  # b's max is 0: one more raises b's step (cross-group choice: other scorers)


def test_endpoints_without_a_group_are_neutral():
    plain = [Endpoint(EndpointSpec(f"p{i}", f"10.1.0.{i}", 8000)) for i in range(3)]
    plain[0].in_flight = 9
    assert score(plain) == [1.0, 1.0, 1.0]
    mixed = [*plain, rank("g", 0, 1), rank("g", 1, 0)]
    s = score(mixed, prefill=False)
    assert s[:3] == [1.0, 1.0, 1.0] and s[4] == 1.0 and s[3] < 1.0


def test_the_pick_charges_the_ranks_prefill_so_the_next_pick_sees_it():
    sc = scorer()
    eps = [rank("g", 0), rank("g", 1)]
    r, cycle = req(500), CycleState()
    sc.score(r, cycle, eps)
    result = SchedulingResult([eps[1]])
    sc.pre_request(r, cycle, result)
    assert result.prefill_tokens == 500


def test_no_charge_without_groups():
    sc = scorer()
    eps = [Endpoint(EndpointSpec("p", "10.1.0.1", 8000))]
    r, cycle = req(500), CycleState()
    sc.score(r, cycle, eps)
    result = SchedulingResult([eps[0]])
    sc.pre_request(r, cycle, result)
    assert result.prefill_tokens == 0


def test_parameters_are_validated():
    with pytest.raises(ConfigError, match="requestTokens"):
        scorer(requestTokens=0)
    with pytest.raises(ConfigError, match="prefill"):
        scorer(prefill="yes please")
    with pytest.raises(ConfigError, match="unknown"):
        scorer(weight=3)


def test_binds_the_named_in_flight_load_producer():
    text = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  name: ap
  parameters: {blockSizeTokens: 32}
- type: inflight-load-producer
  name: load
  parameters: {prefixMatchInfoProducerName: ap}
- type: data-parallel-balance-scorer
  parameters: {inFlightLoadProducerName: load}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: data-parallel-balance-scorer
"""
    cfg = load_config(text, "t.yaml", PluginContext(rng=random.Random(0)))
    dp = cfg.plugins["data-parallel-balance-scorer"]
    assert dp.producer is cfg.plugins["load"]
