"""The approximate prefix match over the whole prompt: the index's walk, its LRU, the token caps of
approx-prefix-cache-producer as llm-d documents them, and our strategies, which match whole prompts
(up to 128K tokens), so conversations that share a long system prompt are told apart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.datalayer.datastore import Datastore
from pickers.config.loader import load_config, load_config_file
from pickers.config.strategies import STRATEGY_CONFIGS
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer, prefix_match

CONFIGS = Path(__file__).resolve().parents[2] / "pickers" / "configs"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
BEST = STRATEGY_CONFIGS["best"]
WEIGHTED = STRATEGY_CONFIGS["weighted"]  # the previous best: a prefix-cache-scorer among load scorers
PRODUCER = "- type: approx-prefix-cache-producer\n  parameters: {maxPrefixTokensToMatch: 131072}\n"
OLD_BEST = WEIGHTED.replace(PRODUCER, "")  # weighted.yaml before: the GIE-shape scorer's 256 blocks of 16 tokens


def words(seed: int, tokens: int) -> str:
    """`tokens` tokens (4 characters each, as the EPP counts) of text no other seed repeats."""
    rng = random.Random(seed)
    return " ".join(f"{rng.randrange(10**6):06d}" for _ in range(tokens * 4 // 7 + 1))[: tokens * 4]


def req(prompt: str, i: int = 0) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", {}, "completions", "m", prompt)


def prefix_scorer(cfg) -> PrefixCacheScorer:
    return next(w.scorer for w in cfg.profile.scorers if isinstance(w.scorer, PrefixCacheScorer))


def producer_scorer(parameters: str) -> PrefixCacheScorer:
    cfg = load_config(f"{HEADER}plugins:\n- type: approx-prefix-cache-producer\n  parameters: {parameters}\n- type: prefix-cache-scorer\n", "t")
    return prefix_scorer(cfg)


def _ep(address: str) -> Endpoint:
    return Endpoint(EndpointSpec(address, address, 8000))


def hashes_of(scorer: PrefixCacheScorer, prompt: str) -> list[int]:
    return prefix_match(req(prompt), CycleState(), scorer.index, scorer.block_chars, scorer.max_blocks).hashes


# -- the index ---------------------------------------------------------------------------------


def leading_run(index: ApproxPrefixIndex, address: str, hashes: list[int]) -> int:
    n = 0
    for h in hashes:
        if not index.holds(address, h):
            break
        n += 1
    return n


@given(st.lists(st.integers(0, 12), min_size=1, max_size=6), st.integers(0, 12), st.data())
def test_match_counts_each_endpoints_leading_run_of_held_blocks(depths, length, data):
    prompt = list(range(1, length + 1))
    index = ApproxPrefixIndex()
    for i, depth in enumerate(depths):
        held = prompt[:depth]
        if data.draw(st.booleans()):  # also holds some later blocks after a gap, which must not count
            held = held + prompt[depth + 1 :]
        index.record(f"ep{i}", held, 10**6)
    expected = {f"ep{i}": leading_run(index, f"ep{i}", prompt) for i in range(len(depths))}
    assert index.match(prompt) == {a: n for a, n in expected.items() if n}


def test_match_reports_the_best_endpoints_share_as_the_hit_ratio():
    index = ApproxPrefixIndex()
    index.record("a", [1, 2, 3])
    index.record("b", [1])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 1}
    assert index.hit_ratio.sum == 0.75 and index.hit_ratio.count == 1


def test_a_full_lru_evicts_a_prompts_tail_before_its_head():
    index = ApproxPrefixIndex()
    index.record("a", [1, 2, 3, 4, 5, 6], capacity=4)
    assert index.match([1, 2, 3, 4, 5, 6]) == {"a": 4}  # blocks 5 and 6 went: the first four still match
    index.record("a", [7, 8])  # another prompt: the least recent blocks are the first one's tail
    assert index.match([1, 2, 3, 4]) == {"a": 2}
    assert index.match([7, 8]) == {"a": 2}
    assert index.blocks_of("a") == 4


def test_block_hashes_chain_every_earlier_block():
    a = block_hashes("m", "x" * 64 + "y" * 64 + "z" * 64)
    b = block_hashes("m", "w" * 64 + "y" * 64 + "z" * 64)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))
    assert block_hashes("m", "x" * 64 + "y" * 64) == a[:2]
    assert block_hashes("m", "x" * 64 + "y" * 63) == a[:1]  # a partial block is not hashed
    assert block_hashes("other", "x" * 64) != a[:1]  # the model (and cache salt) seed the chain
    assert block_hashes("m", "x" * 64, cache_salt="s") != a[:1]


# -- approx-prefix-cache-producer's caps (llm-d's README) ----------------------------------------


def test_max_prefix_tokens_to_match_100000_matches_a_100k_token_prompt_over_its_whole_length():
    scorer = producer_scorer("{maxPrefixTokensToMatch: 100000}")
    prompt = words(1, 100_000)  # ~400,000 characters
    hashes = hashes_of(scorer, prompt)
    assert len(hashes) == 100_000 // 64 == len(prompt) // 256  # every full 64-token block
    near_end = prompt[:-1_000] + words(2, 250)[:1_000]  # the same but its last ~250 tokens
    a, b = _ep("a"), _ep("b")
    scorer.index.record(a.address, hashes)
    scorer.index.record(b.address, hashes_of(scorer, near_end))
    assert list(scorer.score(req(prompt), CycleState(), [a, b])) == [1.0, (len(prompt) - 1_000) // 256 / len(hashes)]


@pytest.mark.parametrize("tokens, blocks", [(1_000, 15), (1_024, 16), (4_000, 62)])
def test_max_prefix_tokens_to_match_caps_the_match_at_that_many_tokens_in_whole_blocks(tokens, blocks):
    scorer = producer_scorer(f"{{maxPrefixTokensToMatch: {tokens}}}")
    prompt = words(3, 8_000)
    assert len(hashes_of(scorer, prompt)) == blocks
    inside = prompt[: blocks * 256 - 1] + "#"  # differs in the last block that is matched
    beyond = prompt[: blocks * 256] + "#" + prompt[blocks * 256 + 1 :]  # differs just past the cap
    assert hashes_of(scorer, inside)[-1] != hashes_of(scorer, prompt)[-1]
    assert hashes_of(scorer, beyond) == hashes_of(scorer, prompt)


def test_both_caps_zero_match_the_whole_prompt_however_long():
    scorer = producer_scorer("{maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 0}")
    assert len(hashes_of(scorer, words(4, 200_000))) == 200_000 // 64  # past the 131072-token default


def test_a_zero_token_cap_falls_back_to_max_prefix_blocks_to_match():
    assert len(hashes_of(producer_scorer("{maxPrefixTokensToMatch: 0}"), words(4, 200_000))) == 2048  # its default
    assert len(hashes_of(producer_scorer("{maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 10}"), words(4, 2_000))) == 10


# -- our strategies ------------------------------------------------------------------------------


def test_best_and_weighted_match_the_whole_prompt_up_to_128k_tokens():
    producer = next(q for q in load_config(BEST, "best").plugins.values() if isinstance(q, ApproxPrefixCacheProducer))
    assert producer.max_blocks * producer.block_chars // 4 == 131_072
    assert producer.block_chars == 256  # llm-d's 64-token blocks: a quarter of the index memory of 16-token ones
    scorer = prefix_scorer(load_config(WEIGHTED, "weighted"))
    assert (scorer.max_blocks, scorer.block_chars) == (producer.max_blocks, producer.block_chars)


def test_pd_matches_the_whole_prompt_up_to_128k_tokens_in_both_profiles_and_the_decider():
    cfg = load_config_file(CONFIGS / "pd.yaml")
    for profile in cfg.profiles:
        scorer = next(w.scorer for w in profile.scorers if isinstance(w.scorer, PrefixCacheScorer))
        assert scorer.max_blocks * scorer.block_chars // 4 == 131_072
    decider = cfg.profile_handler.decider  # type: ignore[attr-defined]
    assert (decider.block_chars, decider.max_blocks) == (256, 131_072 // 64)


def test_the_reference_default_keeps_gies_256_block_cap():
    scorer = prefix_scorer(load_config(STRATEGY_CONFIGS["default"], "default"))
    assert (scorer.block_chars, scorer.max_blocks) == (64, 256)


SYSTEM = words(10, 8_000)  # an 8k-token system prompt every conversation starts with


def _pool(config: str) -> tuple[Datastore, Scheduler, PrefixCacheScorer, list[str]]:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(4))
    ctx = PluginContext(rng=random.Random(5))
    cfg = load_config(config, "test", ctx)
    scorer = prefix_scorer(cfg)
    addresses = [ep.address for ep in ds.candidates()]
    return ds, Scheduler(cfg.profile), scorer, addresses


def _conversations(scorer: PrefixCacheScorer, addresses: list[str]) -> dict[str, str]:
    """Every endpoint has served the system prompt; conversation A lives on pod-1, B on pod-2."""
    history = {"A": SYSTEM + words(11, 2_000), "B": SYSTEM + words(12, 2_000)}
    for address in addresses:
        scorer.index.record(address, hashes_of(scorer, SYSTEM))
    scorer.index.record(addresses[1], hashes_of(scorer, history["A"]))
    scorer.index.record(addresses[2], hashes_of(scorer, history["B"]))
    return {name: h + " next question: " + words(13, 100) for name, h in history.items()}


def test_two_conversations_sharing_an_8k_token_system_prompt_go_where_each_one_lives():
    ds, scheduler, scorer, addresses = _pool(WEIGHTED)
    follow_ups = _conversations(scorer, addresses)
    assert scheduler.schedule(req(follow_ups["A"], 1), ds.candidates()).endpoints[0].address == addresses[1]
    assert scheduler.schedule(req(follow_ups["B"], 2), ds.candidates()).endpoints[0].address == addresses[2]


def test_with_the_old_4k_token_cap_the_two_conversations_look_alike_on_every_endpoint():
    ds, _, scorer, addresses = _pool(OLD_BEST)
    follow_ups = _conversations(scorer, addresses)
    for prompt in follow_ups.values():
        assert set(scorer.score(req(prompt), CycleState(), ds.candidates())) == {1.0}  # a four-way tie
