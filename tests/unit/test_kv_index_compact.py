"""The compact precise index (numpy rows, per-endpoint engine-hash tables) decides as the dict-and-
OrderedDict index it replaced (tests/unit/reference_kv_index.py) for any stream of KV events (stored,
removed, cleared, on any medium, chained to any parent, under every bound) and lookups; removals and
clears are exact; and it stays within its memory per entry."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pickers.indexes import kv_blocks
from pickers.indexes.kv_blocks import KVBlockIndex, TierWeights, engine_key, request_keys
from tests.unit.reference_kv_index import ReferenceKVIndex

ENDPOINTS = ["a:1", "b:1", "c:1", "d:1"]
BLOCK = 2
CONTENTS = [[1, 2], [3, 4], [5, 6]]  # a block's tokens: few, so endpoints' chains share keys
MEDIA = [None, "GPU", "cpu", "disk"]
WEIGHTS = {"gpu": 1.0, "cpu": 0.5}
# engine hashes: ints (vLLM's), and a few bytes (sha256 digests in some versions)
engine_hash = st.one_of(st.integers(0, 12), st.sampled_from([b"\x01" * 32, b"\x02" * 32]))
tokens = st.lists(st.sampled_from(range(len(CONTENTS))), min_size=0, max_size=4).map(lambda c: [t for i in c for t in CONTENTS[i]])
event = st.one_of(
    st.tuples(st.just("stored"), st.sampled_from(ENDPOINTS), st.lists(engine_hash, min_size=1, max_size=4),
              st.one_of(st.none(), engine_hash), tokens, st.booleans(), st.sampled_from([None, None, "lora-x"]),
              st.sampled_from(MEDIA)),
    st.tuples(st.just("also"), st.sampled_from(ENDPOINTS), st.lists(engine_hash, min_size=1, max_size=4), st.sampled_from(MEDIA)),
    st.tuples(st.just("removed"), st.sampled_from(ENDPOINTS), st.lists(engine_hash, min_size=1, max_size=4), st.sampled_from(MEDIA)),
    st.tuples(st.just("cleared"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("gap"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("gone"), st.sampled_from(ENDPOINTS)),
)  # fmt: skip
request = st.tuples(tokens, st.sampled_from([None, "lora-x"]))
speculative = st.dictionaries(st.sampled_from(range(len(CONTENTS))), st.sets(st.sampled_from(ENDPOINTS), max_size=2), max_size=2)


def apply(index: KVBlockIndex | ReferenceKVIndex, e: tuple) -> None:
    kind, address = e[0], e[1]
    if kind == "stored":
        _, _, hashes, parent, ids, partial, lora, medium = e
        if partial and ids:
            ids = ids[:-1]  # a last block short of block_size: not indexed
        index.block_stored(address, hashes, parent, ids, BLOCK, lora, medium)
    elif kind == "also":  # an offloading connector's: the blocks by hash, now also on this medium
        index.block_stored(address, e[2], None, [], BLOCK, None, e[3])
    elif kind == "removed":
        index.block_removed(address, e[2], e[3])
    elif kind == "cleared":
        index.clear_endpoint(address)
    elif kind == "gap":
        index.mark_gap(address)
    else:
        index.remove_endpoint(address)


def same_lookups(new: KVBlockIndex, ref: ReferenceKVIndex, req: tuple, spec: dict[int, set[str]]) -> None:
    ids, lora = req
    keys = request_keys(ids, BLOCK, 8, lora)
    extra = {keys[i]: dict.fromkeys(eps, 1.0) for i, eps in spec.items() if i < len(keys) and eps}
    assert new.match(keys) == ref.match(keys), keys
    assert new.match(keys, extra) == ref.match(keys, extra)
    for medium in ("gpu", "cpu", "disk", "nvme"):
        assert new.medium_match(keys, medium) == ref.medium_match(keys, medium), medium
    wn, wr = TierWeights(new, WEIGHTS), TierWeights(ref, WEIGHTS)  # type: ignore[arg-type]
    assert new.weighted_match(keys, wn) == ref.weighted_match(keys, wr)
    assert new.weighted_match(keys, wn, extra) == ref.weighted_match(keys, wr, extra)
    assert new._lookup(keys, wn, extra) == ref._lookup(keys, wr, extra)


@pytest.mark.parametrize(
    "bounds", [{}, {"capacity_per_endpoint": 3}, {"pods_per_key": 1}, {"pods_per_key": 2, "max_keys": 4},
               {"max_keys": 2, "capacity_per_endpoint": 5}, {"pods_per_key": 3}],
)  # fmt: skip
@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(event, request, speculative), max_size=40))
def test_the_compact_index_agrees_with_the_reference_on_any_event_stream(bounds, events):
    new, ref = KVBlockIndex(**bounds), ReferenceKVIndex(**bounds)
    for e, req, spec in events:
        apply(new, e)
        apply(ref, e)
        assert new.size() == ref.size()
        for a in ENDPOINTS:
            assert new.blocks_of(a) == ref.blocks_of(a), a
            n, r = new.stats(a), ref.stats(a)
            assert (n is None) == (r is None)
            if n is not None and r is not None:
                assert (n.orphans, n.gaps, n.block_size) == (r.orphans, r.gaps, r.block_size)
        assert new.keys_held() == len(ref._holders)
        assert new.lora_names == ref.lora_names
        same_lookups(new, ref, req, spec)


def keys_of(*blocks: list[int]) -> list[int]:
    return request_keys([t for b in blocks for t in b], BLOCK, 8)


def test_a_removed_block_no_longer_matches_and_its_children_stop_the_chain():
    index = KVBlockIndex()
    index.block_stored("a:1", [10, 11, 12], None, [1, 2, 3, 4, 5, 6], BLOCK)
    index.block_stored("b:1", [20, 21], None, [1, 2, 3, 4], BLOCK)
    keys = keys_of([1, 2], [3, 4], [5, 6])
    assert index.match(keys) == {"a:1": 3, "b:1": 2}
    index.block_removed("a:1", [11])
    assert index.match(keys) == {"a:1": 1, "b:1": 2}  # a's third block no longer leads: its parent went
    assert index.match(keys[1:]) == {"b:1": 1}
    index.block_removed("b:1", [20, 21])
    assert index.match(keys) == {"a:1": 1} and index.blocks_of("b:1") == 0
    index.block_stored("a:1", [13], 99, [7, 8], BLOCK)  # a parent it never stored (or removed): not indexed
    assert index.stats("a:1").orphans == 1  # type: ignore[union-attr]


def test_a_cleared_endpoint_matches_nothing_and_other_holders_keep_their_blocks():
    index = KVBlockIndex()
    addresses = [f"10.0.0.{i}:8000" for i in range(5)]
    for i, a in enumerate(addresses):  # a shared prefix (five holders: two inline, three in the dict) and own blocks
        index.block_stored(a, [1, 2, 100 + i], None, [1, 2, 3, 4, 50 + i, 0], BLOCK)
    keys = keys_of([1, 2], [3, 4])
    assert index.match(keys) == dict.fromkeys(addresses, 2)
    for a in (addresses[0], addresses[3]):
        index.clear_endpoint(a)
    left = {a: 2 for a in addresses if a not in (addresses[0], addresses[3])}
    assert index.match(keys) == left
    assert index.match(request_keys([1, 2, 3, 4, 50, 0], BLOCK, 8)) == left  # the first one's own third block is gone too
    assert index.blocks_of(addresses[0]) == 0 and index.size() == 9
    for a in addresses:
        index.clear_endpoint(a)
    assert index.match(keys) == {} and index.keys_held() == 0 and index.size() == 0


def test_the_media_of_a_block_on_a_shared_key_are_kept_per_endpoint():
    index = KVBlockIndex()
    for a in ("a:1", "b:1", "c:1"):
        index.block_stored(a, [1], None, [1, 2], BLOCK)
    index.block_stored("c:1", [1], None, [], BLOCK, medium="CPU")  # c's copy also offloaded
    keys = keys_of([1, 2])
    assert index.medium_match(keys, "cpu") == {"c:1": 1}
    index.block_removed("c:1", [1], medium="GPU")  # still on its CPU tier
    assert index.match(keys) == {"a:1": 1, "b:1": 1, "c:1": 1} and index.medium_match(keys, "gpu") == {"a:1": 1, "b:1": 1}
    index.block_removed("c:1", [1], medium="cpu")
    assert index.match(keys) == {"a:1": 1, "b:1": 1} and index.blocks_of("c:1") == 0


def test_engine_hashes_of_any_type_are_kept_apart_per_endpoint():
    assert engine_key(7) == 7 and engine_key((1 << 64) - 1) == (1 << 64) - 1
    assert len({engine_key(-1), engine_key(1 << 64), engine_key(b"\x00" * 32), engine_key((1, 2)), engine_key("x")}) == 5
    index = KVBlockIndex()
    index.block_stored("a:1", [b"\xaa" * 32], None, [1, 2], BLOCK)
    index.block_stored("a:1", [b"\xbb" * 32], b"\xaa" * 32, [3, 4], BLOCK)  # the parent found by its digest
    assert index.match(keys_of([1, 2], [3, 4])) == {"a:1": 2}
    index.block_removed("a:1", [b"\xaa" * 32])
    assert index.match(keys_of([1, 2], [3, 4])) == {} and index.blocks_of("a:1") == 1


def test_the_capacity_evicts_the_least_recently_stored_exactly_across_batches_of_candidates():
    index, ref = KVBlockIndex(capacity_per_endpoint=300), ReferenceKVIndex(capacity_per_endpoint=300)
    rng = np.random.default_rng(5)
    for step in range(3_000):  # many evictions: candidate batches found, used up and found again
        h = int(rng.integers(0, 1_000))
        t = [h, h + 1]
        for index_ in (index, ref):
            if step % 3 == 2:
                index_.block_stored("a:1", [h], None, [], BLOCK, medium="cpu")  # a touch of a held block
            else:
                index_.block_stored("a:1", [h], None, t, BLOCK)
    assert index.blocks_of("a:1") == ref.blocks_of("a:1") == 300
    for h in range(1_001):
        keys = request_keys([h, h + 1], BLOCK, 1)
        assert index.match(keys) == ref.match(keys), h


def test_stamps_renumbered_at_their_limit_keep_the_order(monkeypatch):
    index, ref = KVBlockIndex(capacity_per_endpoint=5), ReferenceKVIndex(capacity_per_endpoint=5)
    index.block_stored("a:1", [0], None, [0, 0], BLOCK)
    index.stats("a:1").recency.clock = kv_blocks._STAMPS - 3  # type: ignore[union-attr]
    ref.block_stored("a:1", [0], None, [0, 0], BLOCK)
    for h in [1, 2, 3, 4, 0, 5, 6, 7]:
        index.block_stored("a:1", [h], None, [h, h], BLOCK)
        ref.block_stored("a:1", [h], None, [h, h], BLOCK)
    assert index.stats("a:1").recency.clock < 100  # type: ignore[union-attr]
    for h in range(8):
        keys = request_keys([h, h], BLOCK, 1)
        assert index.match(keys) == ref.match(keys), h


def test_lookups_over_wide_pools_and_long_prompts_agree_with_the_reference():
    index, ref = KVBlockIndex(), ReferenceKVIndex()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1_000, 16 * 200).tolist()
    for e in range(100):  # 100 endpoints: prefixes of one prompt, each its own length, some shared by many
        n = int(rng.integers(1, 200))
        for index_ in (index, ref):
            index_.block_stored(f"10.0.0.{e}:1", list(range(n)), None, ids[: 16 * n], 16)
    keys = request_keys(ids, 16, 200)
    w = {"gpu": 1.0}
    assert index.match(keys) == ref.match(keys)
    assert index.weighted_match(keys, TierWeights(index, w)) == ref.weighted_match(keys, TierWeights(ref, w))  # type: ignore[arg-type]
    for e in range(0, 100, 3):
        index.clear_endpoint(f"10.0.0.{e}:1")
        ref.clear_endpoint(f"10.0.0.{e}:1")
    assert index.match(keys) == ref.match(keys) and index.size() == ref.size()


def test_an_entry_costs_at_most_64_bytes():
    index = KVBlockIndex()
    index.block_stored("warm:1", [0], None, [0] * 16, 16)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ids = list(range(64 * 16))
    for i in range(400):  # 25,600 distinct blocks over 10 endpoints
        index.block_stored(f"10.0.0.{i % 10}:1", [i * 1_000 + b for b in range(64)], None, [i, *ids[1:]], 16)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.size() == 25_601
    assert used / 25_600 <= 64, used / 25_600


# Wide sharing: up to 8 endpoints store prefixes of the same long chains (a shared system prompt), so most
# keys have more than two holders and runs of consecutive keys have the same holders, on mixed media
WIDE = [f"10.0.0.{i}:1" for i in range(8)]
CHAINS = [[t for b in range(12) for t in (b, c)] for c in range(2)]  # two 12-block chains of 2-token blocks
wide_event = st.one_of(
    st.tuples(st.just("prefix"), st.sampled_from(WIDE), st.sampled_from(range(len(CHAINS))), st.integers(1, 12)),
    st.tuples(st.just("also"), st.sampled_from(WIDE), st.sampled_from(range(len(CHAINS))), st.integers(0, 11), st.integers(1, 12),
              st.sampled_from(MEDIA)),
    st.tuples(st.just("removed"), st.sampled_from(WIDE), st.sampled_from(range(len(CHAINS))), st.integers(0, 11), st.integers(1, 12),
              st.sampled_from(MEDIA)),
    st.tuples(st.just("cleared"), st.sampled_from(WIDE)),
    st.tuples(st.just("gap"), st.sampled_from(WIDE)),
    st.tuples(st.just("gone"), st.sampled_from(WIDE)),
)  # fmt: skip


# speculative holders of some of a request's keys: endpoints of the pool and one that sent no events
wide_speculative = st.dictionaries(st.integers(0, 11), st.sets(st.sampled_from([*WIDE[:3], "new:1"]), max_size=2), max_size=4)


def inline_holders_agree(index: KVBlockIndex) -> None:
    """A key held by three or more keeps every holder in its dict, its first two inline too; no other key has one."""
    c = index._k.columns
    live = {int(r) for r in np.flatnonzero(c["ep0"] >= 0)}
    assert set(index._more) == {r for r in live if c["more"][r]}
    for r, d in index._more.items():
        assert len(d) > 2
        assert list(d.items())[:2] == [(int(c["ep0"][r]), int(c["m0"][r])), (int(c["ep1"][r]), int(c["m1"][r]))]


def apply_wide(index: KVBlockIndex | ReferenceKVIndex, e: tuple) -> None:
    kind, address = e[0], e[1]
    if kind == "prefix":  # the chain's first blocks (engine hash: chain * 100 + block)
        _, _, c, n = e
        index.block_stored(address, [c * 100 + b for b in range(n)], None, CHAINS[c][: n * BLOCK], BLOCK)
    elif kind in ("also", "removed"):
        _, _, c, start, n, medium = e
        hashes = [c * 100 + b for b in range(start, min(12, start + n))]
        if kind == "also":
            index.block_stored(address, hashes, None, [], BLOCK, None, medium)
        else:
            index.block_removed(address, hashes, medium)
    else:
        apply(index, e)


@pytest.mark.parametrize("bounds", [{}, {"capacity_per_endpoint": 9}, {"pods_per_key": 5}, {"pods_per_key": 3, "max_keys": 10}])
@settings(max_examples=150, deadline=None)
@given(events=st.lists(st.tuples(wide_event, st.sampled_from(range(len(CHAINS))), st.integers(1, 12), wide_speculative), max_size=50))
def test_keys_held_by_many_endpoints_answer_as_the_reference_at_every_step(bounds, events):
    new, ref = KVBlockIndex(**bounds), ReferenceKVIndex(**bounds)
    wn, wr = TierWeights(new, WEIGHTS), TierWeights(ref, WEIGHTS)  # type: ignore[arg-type]
    for e, c, n, spec in events:
        apply_wide(new, e)
        apply_wide(ref, e)
        assert new.size() == ref.size() and new.keys_held() == len(ref._holders)
        inline_holders_agree(new)
        keys = request_keys(CHAINS[c], BLOCK, n)
        extra = {keys[i]: dict.fromkeys(eps, 1.0) for i, eps in spec.items() if i < len(keys) and eps}
        assert new.match(keys) == ref.match(keys), keys
        assert new.match(keys, extra) == ref.match(keys, extra)
        for medium in ("gpu", "cpu", "disk"):
            assert new.medium_match(keys, medium) == ref.medium_match(keys, medium), medium
        assert new._weighted(keys, wn, None) == ref._weighted(keys, wr, None)  # the same floats, to the last bit
        assert new._weighted(keys, wn, extra) == ref._weighted(keys, wr, extra)
        assert new.lookup(keys, wn) == ref.lookup(keys, wr)


def test_a_prefix_all_endpoints_hold_matches_each_to_where_its_copy_ends():
    index, ref = KVBlockIndex(), ReferenceKVIndex()
    ids = list(range(2 * 40))
    for e in range(30):  # 30 holders of the first 20 blocks; past them, fewer and fewer
        for index_ in (index, ref):
            index_.block_stored(f"10.0.0.{e}:1", list(range(20 + e % 7)), None, ids[: 2 * (20 + e % 7)], BLOCK)
            if e % 3 == 0:
                index_.block_stored(f"10.0.0.{e}:1", list(range(10)), None, [], BLOCK, medium="cpu")
    keys = request_keys(ids, BLOCK, 40)
    held = index.match(keys)
    assert held == ref.match(keys) and held == {f"10.0.0.{e}:1": 20 + e % 7 for e in range(30)}
    w, wr = TierWeights(index, {"gpu": 0.3, "cpu": 0.7}), TierWeights(ref, {"gpu": 0.3, "cpu": 0.7})  # type: ignore[arg-type]
    assert index._weighted(keys, w, None) == ref._weighted(keys, wr, None)
    assert index.medium_match(keys, "cpu") == ref.medium_match(keys, "cpu") == {f"10.0.0.{e}:1": 10 for e in range(0, 30, 3)}


@pytest.mark.parametrize("place", [0, 1, 2])
def test_any_holder_of_a_shared_key_losing_one_medium_keeps_the_other(place):
    index = KVBlockIndex()
    order = ["a:1", "b:1", "c:1"]
    who = order[place]
    for a in order:  # stored in this order: `who` is the key's first, second or third holder
        index.block_stored(a, [1], None, [1, 2], BLOCK)
        if a == who:
            index.block_stored(who, [1], None, [], BLOCK, medium="cpu")
    index.block_removed(who, [1], medium="gpu")
    inline_holders_agree(index)
    keys = keys_of([1, 2])
    assert index.medium_match(keys, "cpu") == {who: 1}
    assert index.medium_match(keys, "gpu") == {a: 1 for a in ("a:1", "b:1", "c:1") if a != who}
    index.clear_endpoint("b:1" if who != "b:1" else "a:1")  # two holders left: inline only, the media kept
    inline_holders_agree(index)
    assert index.medium_match(keys, "cpu") == {who: 1}


def test_speculative_holders_join_the_stored_ones_of_the_same_endpoint_key_by_key():
    index, ref = KVBlockIndex(), ReferenceKVIndex()
    for a in ("a:1", "b:1", "c:1"):  # three holders of the first block (a shared key), a also of the second
        for index_ in (index, ref):
            index_.block_stored(a, [1, 2] if a == "a:1" else [1], None, [1, 2, 3, 4] if a == "a:1" else [1, 2], BLOCK)
    keys = keys_of([1, 2], [3, 4], [5, 6])
    extra = {keys[1]: {"b:1": 1.0}, keys[2]: {"a:1": 1.0, "b:1": 1.0, "new:1": 1.0}}  # new:1 sent no events
    assert index.match(keys, extra) == ref.match(keys, extra) == {"a:1": 3, "b:1": 3, "c:1": 1}
    w, wr = TierWeights(index, WEIGHTS), TierWeights(ref, WEIGHTS)  # type: ignore[arg-type]
    assert index._weighted(keys, w, extra) == ref._weighted(keys, wr, extra) == ({"a:1": 3.0, "b:1": 3.0, "c:1": 1.0}, 3)


def test_keys_no_block_can_have_are_held_by_nobody():
    index, ref = KVBlockIndex(), ReferenceKVIndex()
    for index_ in (index, ref):
        index_.block_stored("a:1", [1], None, [1, 2], BLOCK)
    held = keys_of([1, 2])
    w = TierWeights(index, WEIGHTS)
    for keys in ([1 << 70], [-5], ["x"], [*held, 1 << 70], [*held, "x"]):
        assert index.match(keys) == ref.match(keys), keys  # type: ignore[arg-type]
        assert index.weighted_match(keys, w) == ref.weighted_match(keys, TierWeights(ref, WEIGHTS)), keys  # type: ignore[arg-type]
        assert index.medium_match(keys, "gpu") == ref.medium_match(keys, "gpu"), keys  # type: ignore[arg-type]
