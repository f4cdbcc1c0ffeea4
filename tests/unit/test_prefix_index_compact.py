"""The compact prefix index (numpy rows, per-endpoint queues) decides as the dict-and-OrderedDict index
it replaced (tests/unit/reference_prefix_index.py) for any sequence of records, lookups and removals,
and stays within its memory bound."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pickers.indexes.block_table import BlockTable
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from tests.unit.reference_prefix_index import ReferencePrefixIndex

ENDPOINTS = ["a:1", "b:1", "c:1", "d:1", "e:1"]
# a prompt: distinct blocks from a small universe, so prompts share, branch and repeat
prompt = st.lists(st.integers(0, 40), min_size=0, max_size=12, unique=True)
op = st.one_of(
    st.tuples(st.just("record"), st.sampled_from(ENDPOINTS), prompt, st.sampled_from([None, 3, 6, 20])),
    st.tuples(st.just("match"), prompt),
    st.tuples(st.just("shared"), prompt, st.integers(0, 12)),
    st.tuples(st.just("room"), st.sampled_from(ENDPOINTS), st.integers(0, 10), st.integers(0, 5)),
    st.tuples(st.just("remove"), st.sampled_from(ENDPOINTS)),
)


# 0: every id below 64 (the small pools' bitset walk); 70 endpoints first: the walk of wider pools
@pytest.mark.parametrize("others", [0, 70])
@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=60))
def test_the_compact_index_agrees_with_the_reference_after_any_operations(others, ops):
    new, ref = ApproxPrefixIndex(default_capacity=8), ReferencePrefixIndex(default_capacity=8)
    for i in range(others):  # endpoints that hold nothing: the ones under test get ids past them
        new.record(f"other-{i}:1", [], None, 0.0)
        ref.record(f"other-{i}:1", [], None, 0.0)
    now = 0.0
    for o in ops:
        now += 1.0
        if o[0] == "record":
            _, address, hashes, capacity = o
            new.record(address, hashes, capacity, now)
            ref.record(address, hashes, capacity, now)
        elif o[0] == "match":
            assert new.match(o[1]) == ref.match(o[1])
        elif o[0] == "shared":
            assert new.shared_prefix(o[1], o[2]) == ref.shared_prefix(o[1], o[2])
        elif o[0] == "room":
            _, address, blocks, horizon = o
            if ref._lru.get(address) or blocks <= ref._capacity.get(address, ref.default_capacity):
                assert new.room(address, blocks, now, horizon) == ref.room(address, blocks, now, horizon)
        else:
            new.remove_endpoint(o[1])
            ref.remove_endpoint(o[1])
        assert new.size() == ref.size()
        assert new.bound() == ref.bound()
        assert [new.blocks_of(a) for a in ENDPOINTS] == [ref.blocks_of(a) for a in ENDPOINTS]
    for h in range(41):
        for a in ENDPOINTS:
            assert new.holds(a, h) == (a in ref._holders.get(h, ())), (a, h)


def test_match_lengths_gives_every_endpoints_leading_run_in_one_array():
    index = ApproxPrefixIndex()
    index.record("a:1", [1, 2, 3])
    index.record("b:1", [1, 2])
    index.record("c:1", [7])
    ids = index.endpoint_ids(["c:1", "b:1", "x:1", "a:1"])
    assert ids[2] == -1  # holds nothing: reads 0
    assert index.match_lengths([1, 2, 3, 4], ids).tolist() == [0, 2, 0, 3]


def test_a_block_held_by_many_endpoints_matches_for_each_of_them():
    index = ApproxPrefixIndex()
    addresses = [f"10.0.0.{i}:8000" for i in range(50)]
    for i, a in enumerate(addresses):
        index.record(a, [100, 200, 300 + i % 2])  # a shared prefix, then two ways on
    assert index.match([100, 200, 300]) == {a: 3 if i % 2 == 0 else 2 for i, a in enumerate(addresses)}
    assert index.shared_prefix([100, 200, 300], 3) == (2, 2)
    for a in addresses[::2]:
        index.remove_endpoint(a)
    assert index.match([100, 200, 300]) == {a: 2 for a in addresses[1::2]}


def test_a_full_lru_keeps_the_entries_per_endpoint_at_its_capacity_through_many_prompts():
    index = ApproxPrefixIndex()
    for i in range(2_000):
        index.record("a:1", block_hashes("m", f"{i:08d}" + "x" * 1_000, "", 256, 64), 500)
    assert index.blocks_of("a:1") == index.size() == 500
    assert index.match(block_hashes("m", f"{1_999:08d}" + "x" * 1_000, "", 256, 64)) == {"a:1": 15}


def test_an_entry_costs_at_most_64_bytes():
    prompts = [block_hashes("m", f"{i:08d}" + "y" * 8_000, "", 256, 64) for i in range(2_000)]
    tracemalloc.start()
    index = ApproxPrefixIndex()
    before = tracemalloc.get_traced_memory()[0]
    for i, h in enumerate(prompts):
        index.record(f"10.0.0.{i % 10}:8000", h, 30_000)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert index.size() == 2_000 * 125
    assert used / index.size() <= 64, used / index.size()


def test_the_block_table_finds_what_it_holds_after_growth_and_deletes():
    table = BlockTable({"v": (np.int32, 1, -1)})
    keys = np.arange(1, 5_001, dtype=np.uint64) * np.uint64(0x9E3779B1)
    rows = table.add(keys)
    table.columns["v"][rows] = np.arange(5_000)
    table.remove(rows[::2])
    found = table.find(keys)
    assert (found[::2] == -1).all()
    assert (table.columns["v"][found[1::2]] == np.arange(1, 5_000, 2)).all()
    again = table.add(keys[::2])  # deleted slots and freed rows are used again
    assert (table.find(keys[::2]) == again).all() and table.used == 5_000


def test_a_peer_record_with_repeated_blocks_is_taken_once() -> None:
    """What comes over the peer stream is not trusted to be distinct: the index holds each block once."""
    from extproc.peers.journal import SharedPrefixIndex

    index = SharedPrefixIndex()
    index.apply_peer("10.0.0.1:8000", [11, 12, 11, 13, 12], 0)
    assert index.blocks_of("10.0.0.1:8000") == 3
    assert index.match([11, 12, 13]) == {"10.0.0.1:8000": 3}
    index.remove_endpoint("10.0.0.1:8000")
    assert index.size() == 0 and index.match([11]) == {}


@pytest.mark.parametrize("seed", range(4))
def test_queues_compacted_a_slice_per_record_still_agree_with_the_reference(seed):
    """Queues long enough that a compaction runs over many records (512 elements a record), with
    re-records leaving stale elements and evictions from the head meeting the compaction under way:
    every lookup, room check and count agrees with the reference at every step."""
    import random

    rng = random.Random(seed)
    capacity = 1_500
    new, ref = ApproxPrefixIndex(default_capacity=capacity), ReferencePrefixIndex(default_capacity=capacity)
    # prompts share one of a few 40-block system prompts and go on with their own 20 blocks
    systems = [[10_000 * (s + 1) + i for i in range(40)] for s in range(4)]
    prompts = [systems[rng.randrange(4)] + [1_000_000 + 100 * p + i for i in range(20)] for p in range(300)]
    compacted = 0
    for step in range(1_500):
        now = float(step)
        address = ENDPOINTS[rng.randrange(2)] if rng.random() < 0.8 else ENDPOINTS[rng.randrange(5)]
        hashes = prompts[rng.randrange(len(prompts))]
        if rng.random() < 0.1:  # an endpoint's cache shrinks or grows
            cap = rng.choice([None, 900, 2_000])
        else:
            cap = None
        new.record(address, hashes, cap, now)
        ref.record(address, hashes, cap, now)
        compacted += any(lru.read >= 0 for lru in new._lru.values())
        probe = prompts[rng.randrange(len(prompts))]
        assert new.match(probe) == ref.match(probe), step
        assert [new.blocks_of(a) for a in ENDPOINTS] == [ref.blocks_of(a) for a in ENDPOINTS], step
        for a in ENDPOINTS:
            if ref._lru.get(a):
                assert new.room(a, 50, now, 30.0) == ref.room(a, 50, now, 30.0), (step, a)
        if step == 1_000:
            new.remove_endpoint(ENDPOINTS[0])
            ref.remove_endpoint(ENDPOINTS[0])
    assert compacted > 50  # the records above did run with a compaction under way
    assert new.size() == ref.size()


def test_room_columns_agree_with_room_across_growth_a_new_default_capacity_and_removals() -> None:
    # 40 endpoints (the per-endpoint rows grow past their first 17 columns), some with capacities of
    # their own, some on the default; full ones with old and new blocks; ids of -1 for unknown addresses
    index = ApproxPrefixIndex(default_capacity=8)
    rng = np.random.default_rng(3)
    addresses = [f"10.0.0.{i}:8000" for i in range(40)]

    def record(some: list[str]) -> None:
        for a in some:
            i = addresses.index(a)
            blocks = [int(x) for x in rng.choice(10_000, size=int(rng.integers(1, 12)), replace=False)]
            index.record(a, blocks, capacity=(6 if i % 3 == 0 else None), now=100.0 + i)

    def check(now: float, horizon: float) -> None:
        asked = [*addresses, "10.9.9.9:1"]
        blocks = rng.integers(0, 10, size=len(asked)).astype(np.float64)
        got = index.room_columns(index.endpoint_ids(tuple(asked)), blocks, now, horizon)
        want = [index.room(a, int(b), now, horizon) for a, b in zip(asked, blocks)]
        assert got.tolist() == want

    record(addresses[:10])
    check(now=150.0, horizon=60.0)
    record(addresses[10:])  # the rows grow: the first ten's, not recorded again, must be kept
    check(now=150.0, horizon=60.0)
    check(now=200.0, horizon=60.0)  # the early ones' blocks are past the horizon now
    index.default_capacity = 20  # the endpoints on the default get more room
    check(now=150.0, horizon=60.0)
    index.remove_endpoint(addresses[5])
    index.remove_endpoint(addresses[30])
    check(now=150.0, horizon=60.0)
