"""latency-cost-scorer: the request's predicted TTFT plus the stall its prefill adds to the batch
running on the endpoint, scored cheapest-first; its parameters, and --explain-scores."""

from __future__ import annotations

import time

import pytest

from pickers.framework.errors import ConfigError
from pickers.framework.types import CycleState
from pickers.indexes.prefix import block_hashes
from pickers.plugins.latency.cost import FOOTPRINT, LatencyCostScorer
from tests.unit.test_latency_plugins import PROMPT, ctx, ep, load, req


def scorer(params: str = "") -> LatencyCostScorer:
    cfg = load("plugins:\n- type: latency-cost-scorer\n" + (f"  parameters: {params}\n" if params else ""))
    s = cfg.plugins["latency-cost-scorer"]
    assert isinstance(s, LatencyCostScorer)
    return s


def cache(s: LatencyCostScorer, endpoint, prompt: str = PROMPT) -> None:
    """Record the prompt's blocks on the endpoint, as a pick there does."""
    src = s.producer.source
    r = req()
    s.ctx.prefix_index.record(endpoint.address, block_hashes(r.model, prompt, r.cache_salt, src.max_blocks, src.block_chars))


def written(s: LatencyCostScorer) -> float:
    """FOOTPRINT x the compute of the prompt's whole blocks (its last partial block is not written)."""
    bt = s.producer.source.block_chars // 4
    return FOOTPRINT * (1000 // bt * bt) / 10_000


def test_cost_is_ttft_plus_the_prefill_stall_of_each_running_request_plus_the_cache_it_takes():
    s = scorer()
    idle, busy = ep(1), ep(2, in_flight=4)  # prior: 10 ms + 1,000 tokens at 10k/s = 110 ms TTFT
    costs = s.costs(req(), CycleState(), [idle, busy])
    assert costs[0] == pytest.approx(0.110 + written(s))
    assert costs[1] == pytest.approx(0.110 + 4 * 0.100 + written(s))  # each of 4 running requests waits out the 100 ms prefill


def test_the_cheapest_endpoint_scores_1_and_the_others_their_cost_ratio():
    s = scorer()
    idle, busy = ep(1), ep(2, in_flight=4)
    w = written(s)
    assert s.score(req(), CycleState(), [idle, busy]) == pytest.approx([1.0, (0.110 + w) / (0.510 + w)])


def test_a_cached_prompt_stays_where_it_is_cached_while_the_batch_there_is_small():
    s = scorer()
    warm, cold = ep(1, in_flight=1), ep(2)
    cache(s, warm)
    scores = s.score(req(), CycleState(), [warm, cold])
    assert scores[0] == 1.0 > scores[1]


def test_a_busy_endpoint_loses_a_cached_prompt_when_its_batch_outweighs_the_prefill():
    s = scorer()
    warm, cold = ep(1, in_flight=30), ep(2)
    cache(s, warm)
    # warm: the prompt minus its last partial block is cached, but 30 running requests each stall for
    # whatever it prefills, and its TTFT grows with the queued work; cold: 110 ms and nobody waits
    warm.in_flight_prefill_tokens = 2000
    scores = s.score(req(), CycleState(), [warm, cold])
    assert scores[1] == 1.0 > scores[0]


def test_slowdown_weight_0_is_llm_ds_lowest_predicted_ttft():
    s = scorer("{slowdownWeight: 0}")
    idle, busy = ep(1), ep(2, in_flight=50)
    costs = s.costs(req(), CycleState(), [idle, busy])
    assert costs[0] == pytest.approx(costs[1])  # the prior charges nothing per running request


def test_slowdown_weight_must_be_a_finite_non_negative_number():
    for bad in ("-1", ".inf", "lots"):
        with pytest.raises(ConfigError, match="slowdownWeight"):
            load(f"plugins:\n- type: latency-cost-scorer\n  parameters: {{slowdownWeight: {bad}}}\n")


def test_explain_shows_each_candidates_cost_and_predicted_ttft():
    s = scorer()
    cycle = CycleState()
    a, b = ep(1), ep(2, in_flight=2)
    s.score(req(), cycle, [a, b])
    shown = s.explain(cycle)
    w = 1000 * written(s)
    assert shown["latency-cost-scorer/cost_ms"] == {a.address: round(110.0 + w, 1), b.address: round(310.0 + w, 1)}
    assert "predicted-latency-producer/ttft_ms" in shown  # the implied producer's predictions too


def test_the_producer_it_reads_can_be_named():
    cfg = load(
        "plugins:\n- type: predicted-latency-producer\n  name: mine\n- type: latency-cost-scorer\n"
        "  parameters: {latencyPredictionInfoProducerName: mine}\n",
        ctx(),
    )
    s = cfg.plugins["latency-cost-scorer"]
    assert isinstance(s, LatencyCostScorer) and s.producer is cfg.plugins["mine"]


# -- shared prefixes and cache room ------------------------------------------------------------------

SYSTEM = "".join(f"s{i:05d}" for i in range(1200))  # ~1,800 tokens every conversation opens with


def conversation(i: int) -> str:
    return SYSTEM + "".join(f"c{i:02d}{j:03d}" for j in range(200))  # ~300 tokens of its own


def test_a_prefix_continued_several_ways_is_shared_and_its_fanout_counted():
    s = scorer()
    a = ep(1)
    for i in range(3):
        cache(s, a, conversation(i))
    src = s.producer.source
    r = req()
    hashes = block_hashes(r.model, conversation(9), r.cache_salt, src.max_blocks, src.block_chars)
    held = s.ctx.prefix_index.match(hashes)[a.address]
    shared, fanout = s.ctx.prefix_index.shared_prefix(hashes, held)
    assert fanout == 3 and shared == held  # everything it holds of a new conversation is the system prompt
    own = block_hashes(r.model, conversation(1), r.cache_salt, src.max_blocks, src.block_chars)
    assert s.ctx.prefix_index.shared_prefix(own, len(own))[0] == shared  # its own history is not shared


def test_a_new_conversation_pays_its_share_of_copying_a_shared_prompt_to_an_idle_endpoint():
    s = scorer()
    warm, cold = ep(1, in_flight=6), ep(2)
    for i in range(8):
        cache(s, warm, conversation(i))
    costs = s.costs(req_with(conversation(20)), CycleState(), [warm, cold])
    # cold: the ~1,800 shared tokens at 1/8 and its own ~300; warm: its own ~300, but 6 requests wait
    assert costs[1] < costs[0]
    s_plain = scorer()
    for i in range(1):  # one conversation so far: nothing is shared yet, the prompt is copied at full cost
        cache(s_plain, warm, conversation(i))
    plain = s_plain.costs(req_with(conversation(20)), CycleState(), [warm, cold])
    assert plain[1] > costs[1]


def test_a_full_endpoint_whose_blocks_are_live_is_charged_the_recompute_of_what_it_evicts():
    s = scorer()
    full, roomy = ep(1), ep(2)
    index = s.ctx.prefix_index
    r = req()
    src = s.producer.source
    filler = block_hashes(r.model, "".join(f"f{i:07d}" for i in range(4000)), r.cache_salt, 10_000, src.block_chars)
    index.record(full.address, filler, capacity=len(filler))  # full, every block just used
    index.record(roomy.address, filler[:10], capacity=10 * len(filler))
    costs = s.costs(req(), CycleState(), [full, roomy])
    evicted = written(s) / FOOTPRINT
    assert costs[0] == pytest.approx(0.110 + evicted)  # its TTFT plus the prefill of the live blocks it evicts
    assert costs[1] == pytest.approx(0.110 + written(s))
    assert not index.room(full.address, 1, now=time.monotonic(), horizon=60.0)
    assert index.room(full.address, 1, now=time.monotonic() + 61.0, horizon=60.0)  # a minute later it is dead


def req_with(prompt: str):
    r = req()
    r.prompt_text = prompt
    return r
