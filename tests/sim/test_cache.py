"""The prefix cache on its own: block hashing, hits, refcounts, LRU eviction and its events."""

from __future__ import annotations

from vllm_sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent, PrefixCache, block_hashes

BS = 4


def prompt(tag: int, n_tokens: int) -> list[int]:
    return [tag * 1000 + i for i in range(n_tokens)]


def alloc(cache: PrefixCache, tokens: list[int], extra: int = 1):  # type: ignore[no-untyped-def]
    return cache.allocate(tokens, block_hashes(tokens, BS), len(tokens) + extra)


def test_block_hash_chains_so_equal_blocks_after_different_prefixes_differ() -> None:
    a = block_hashes([1, 2, 3, 4, 9, 9, 9, 9], BS)
    b = block_hashes([5, 6, 7, 8, 9, 9, 9, 9], BS)
    assert len(a) == 2 and a[1] != b[1]
    assert block_hashes([1, 2, 3, 4, 5], BS) == a[:1]  # partial trailing block has no hash


def test_repeated_prefix_hits_all_but_the_block_holding_the_last_prompt_token() -> None:
    cache = PrefixCache(num_blocks=100, block_size=BS)
    first = alloc(cache, prompt(1, 10))
    assert first is not None and first.hit_blocks == 0
    cache.free(first)
    again = alloc(cache, prompt(1, 10))
    assert again is not None and again.hit_blocks == 2
    cache.free(again)
    aligned = alloc(cache, prompt(1, 8))  # fully cached, but one token must be recomputed
    assert aligned is not None and aligned.hit_blocks == 1


def test_usage_counts_blocks_held_by_running_requests_only() -> None:
    cache = PrefixCache(num_blocks=10, block_size=BS)
    a = alloc(cache, prompt(1, 8), extra=4)  # 2 hashed + 1 for output
    assert a is not None and cache.usage == 0.3
    cache.free(a)
    assert cache.usage == 0.0 and cache.cached_blocks == 2


def test_least_recently_used_free_blocks_are_evicted_first() -> None:
    cache = PrefixCache(num_blocks=6, block_size=BS)
    for tag in (1, 2):
        a = alloc(cache, prompt(tag, 9), extra=0)  # 2 hashed + 1 partial
        assert a is not None
        cache.free(a)
    c = alloc(cache, prompt(3, 9), extra=0)  # needs 3: 2 empty + evicts one block of prompt 1
    assert c is not None
    cache.free(c)
    assert cache.count_hits(block_hashes(prompt(2, 9), BS), 9) == 2
    assert cache.count_hits(block_hashes(prompt(1, 9), BS), 9) == 1  # its tail block went first


def test_blocks_in_use_are_never_evicted_and_a_request_that_does_not_fit_changes_nothing() -> None:
    cache = PrefixCache(num_blocks=4, block_size=BS)
    held = alloc(cache, prompt(1, 12), extra=0)
    assert held is not None
    assert alloc(cache, prompt(2, 8), extra=0) is None
    assert cache.used_blocks == 3 and cache.cached_blocks == 3


def test_listeners_see_stored_removed_and_cleared_events() -> None:
    cache = PrefixCache(num_blocks=2, block_size=BS)
    events: list[CacheEvent] = []
    cache.subscribe(events.append)
    a = alloc(cache, prompt(1, 8), extra=0)
    assert a is not None
    cache.free(a)
    b = alloc(cache, prompt(2, 4), extra=0)
    assert b is not None
    cache.reset()
    hashes = block_hashes(prompt(1, 8), BS)
    assert events[0] == BlockStored((hashes[0],), None, tuple(prompt(1, 4)), BS)
    assert events[1] == BlockStored((hashes[1],), hashes[0], tuple(prompt(1, 8)[4:]), BS)
    assert BlockRemoved((hashes[1],)) in events
    assert events[-1] == AllBlocksCleared()
