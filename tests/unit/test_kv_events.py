"""KV events: decoding both encodings (and a real vLLM 0.32 capture), the precise index, sequence
gaps and restarts, and the simulator's publisher through a real ZMQ socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import (
    KV_EVENTS_PORT_LABEL,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventSubscriber,
    SequenceTracker,
    apply_events,
    decode_batch,
    kv_events_address,
)
from extproc.datalayer.scraper import parse_vllm_metrics
from pickers.framework.endpoint import EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys

FIXTURES = Path(__file__).parent.parent / "fixtures"
A = "10.0.0.1:8000"
B = "10.0.0.2:8000"


def real_messages() -> tuple[dict, list[list[bytes]]]:
    d = json.loads((FIXTURES / "vllm-0.32-kv-events.json").read_text())
    return d, [[bytes.fromhex(f) for f in m] for m in d["messages"]]


def batch(events: list, seq_ts: float = 1.0) -> bytes:
    return msgspec.msgpack.encode([seq_ts, events, None])


def stored_map(hashes, parent, tokens, bs=4) -> dict:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": bs, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None] * len(hashes),
            "group_idx": 0, "kv_cache_spec_kind": "full_attention"}


def test_real_vllm_batch_decodes_to_block_stored():
    d, msgs = real_messages()
    topic, seq, payload = msgs[0]
    assert topic.startswith(b"kv@127.0.0.1:") and topic.endswith(b"@tiny")
    assert len(seq) == 8
    b = decode_batch(payload)
    assert b.skipped == 0
    (e,) = b.events
    assert isinstance(e, BlockStored)
    assert e.block_size == 32 and e.parent_block_hash is None
    assert len(e.token_ids) == 32 * len(e.block_hashes)
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in e.block_hashes)


def test_real_vllm_events_index_the_prompt_they_came_from():
    d, msgs = real_messages()
    index = KVBlockIndex()
    for _, _, payload in msgs:
        apply_events(index, A, decode_batch(payload).events)
    first = decode_batch(msgs[0][2]).events[0]
    keys = request_keys(first.token_ids + [1, 2, 3], 32, 256)  # the prompt went on past the last full block
    assert index.match(keys) == {A: len(first.block_hashes)}


def test_map_and_array_encodings_decode_alike():
    as_map = decode_batch(batch([stored_map([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8])])).events[0]
    as_array = decode_batch(batch([["BlockStored", [11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "GPU"]])).events[0]
    assert as_map == as_array
    removed = decode_batch(batch([["BlockRemoved", [11], "GPU"], {"type": "BlockRemoved", "block_hashes": [12]}])).events
    assert removed == [BlockRemoved([11], "GPU"), BlockRemoved([12])]
    cleared = decode_batch(batch([["AllBlocksCleared"], {"type": "AllBlocksCleared"}])).events
    assert cleared == [AllBlocksCleared(), AllBlocksCleared()]


def test_older_array_events_with_fewer_fields_decode():
    e = decode_batch(msgspec.msgpack.encode([1.0, [["BlockStored", [b"\x01" * 32], None, [1, 2, 3, 4], 4]]])).events[0]
    assert isinstance(e, BlockStored) and e.block_hashes == [b"\x01" * 32] and e.lora_id is None


def test_unknown_event_types_are_skipped_not_fatal():
    b = decode_batch(batch([{"type": "SomethingNew", "x": 1}, ["Other"], {"type": "AllBlocksCleared"}]))
    assert b.events == [AllBlocksCleared()] and b.skipped == 2


def test_index_chains_children_through_the_engines_parent_hash():
    index = KVBlockIndex()
    apply_events(index, A, [BlockStored([101], None, [1, 2, 3, 4], 4)])
    apply_events(index, A, [BlockStored([102, 103], 101, [5, 6, 7, 8, 9, 10, 11, 12], 4)])
    keys = request_keys(list(range(1, 13)), 4, 256)
    assert index.match(keys) == {A: 3}
    assert index.match(request_keys([1, 2, 3, 4, 0, 0, 0, 0], 4, 256)) == {A: 1}


def test_blocks_with_an_unknown_parent_are_not_guessed():
    index = KVBlockIndex()
    apply_events(index, A, [BlockStored([102], 999, [5, 6, 7, 8], 4)])
    assert index.blocks_of(A) == 0 and index.stats(A).orphans == 1


def test_removed_and_cleared_blocks_stop_matching():
    index = KVBlockIndex()
    toks = list(range(1, 13))
    for ep in (A, B):
        apply_events(index, ep, [BlockStored([1, 2, 3], None, toks, 4)])
    keys = request_keys(toks, 4, 256)
    apply_events(index, A, [BlockRemoved([3])])
    assert index.match(keys) == {A: 2, B: 3}
    apply_events(index, B, [AllBlocksCleared()])
    assert index.match(keys) == {A: 2}


def test_memory_is_bounded_per_endpoint():
    index = KVBlockIndex(capacity_per_endpoint=10)
    for i in range(100):
        apply_events(index, A, [BlockStored([i], None, [i, i, i, i], 4)])
    assert index.blocks_of(A) == 10 and index.size() == 10
    assert index.match(request_keys([99] * 4, 4, 1)) == {A: 1}
    assert index.match(request_keys([0] * 4, 4, 1)) == {}


def test_sequence_tracker_sees_order_gaps_and_restarts():
    s = SequenceTracker()
    assert [s.see(n) for n in (7, 8, 9, 11, 12, 0, 1)] == ["ok", "ok", "ok", "gap", "ok", "restart", "ok"]


def subscriber(index: KVBlockIndex) -> KVEventSubscriber:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    return KVEventSubscriber(ds, index)


def test_a_sequence_gap_resets_that_endpoints_entries():
    index = KVBlockIndex()
    sub, seq = subscriber(index), SequenceTracker()
    sub.handle_message(A, [b"kv@a@m", (0).to_bytes(8, "big"), batch([stored_map([1], None, [1, 2, 3, 4])])], seq)
    assert index.blocks_of(A) == 1
    sub.handle_message(A, [b"kv@a@m", (2).to_bytes(8, "big"), batch([stored_map([2], None, [5, 6, 7, 8])])], seq)
    # the lost message may have removed block 1: only what came after the gap is trusted
    assert index.blocks_of(A) == 1 and index.match(request_keys([1, 2, 3, 4], 4, 1)) == {}
    assert sub.gaps == 1 and index.stats(A).gaps == 1


def test_a_restarted_publisher_resets_that_endpoints_entries():
    index = KVBlockIndex()
    sub, seq = subscriber(index), SequenceTracker()
    sub.handle_message(A, [b"t", (5).to_bytes(8, "big"), batch([stored_map([1], None, [1, 2, 3, 4])])], seq)
    sub.handle_message(A, [b"t", (0).to_bytes(8, "big"), batch([])], seq)
    assert index.blocks_of(A) == 0 and sub.gaps == 0


def test_endpoints_leaving_the_pool_leave_the_index():
    index = KVBlockIndex()
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    KVEventSubscriber(ds, index)
    apply_events(index, B, [BlockStored([1], None, [1, 2, 3, 4], 4)])
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    assert index.blocks_of(B) == 0


def test_the_zmq_address_comes_from_the_label_else_the_default_port():
    plain = EndpointSpec("a", "10.0.0.1", 8000)
    labelled = EndpointSpec("b", "10.0.0.2", 8000, labels={KV_EVENTS_PORT_LABEL: "6001"})
    assert kv_events_address(plain, 5557) == "tcp://10.0.0.1:5557"
    assert kv_events_address(plain, None) is None
    assert kv_events_address(labelled, None) == "tcp://10.0.0.2:6001"


def test_parser_reads_real_vllm_metrics():
    m = parse_vllm_metrics((FIXTURES / "vllm-0.32-metrics.txt").read_text())
    assert (m.waiting, m.running, m.kv_usage) == (0, 0, 0.0)
    assert m.block_size == 32 and m.num_gpu_blocks == 16384
    assert m.prefix_cache_queries >= m.prefix_cache_hits > 0


async def test_simulator_events_reach_the_index_over_zmq():
    """A simulator publishing on a real socket, our subscriber following it through the datastore."""
    from vllm_sim import tokens
    from vllm_sim.config import SimConfig
    from vllm_sim.kv_events import KVEventsConfig
    from vllm_sim.server import SimServer

    config = SimConfig.from_profile("gpu", time_scale=0.01, block_size=4, kv_events=KVEventsConfig("tcp://*:0"))
    async with SimServer(config) as sim:
        assert sim.kv_events is not None
        kv_port = sim.kv_events.port  # bound by the publisher itself: nothing can take it first
        index = KVBlockIndex()
        ds = Datastore()
        sub = KVEventSubscriber(ds, index, default_port=None)
        task = asyncio.create_task(sub.run())
        ds.set_endpoints([EndpointSpec("s", "127.0.0.1", sim.port, labels={KV_EVENTS_PORT_LABEL: str(kv_port)})])
        try:
            await asyncio.sleep(0.3)  # the SUB socket connects
            import aiohttp

            prompt = "a prompt long enough to fill several blocks of four tokens each"
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{sim.url}/v1/completions", json={"model": "sim-model", "prompt": prompt, "max_tokens": 2}) as r:
                    assert r.status == 200
            keys = request_keys(tokens.encode(prompt), 4, 256)
            for _ in range(100):
                if index.match(keys):
                    break
                await asyncio.sleep(0.02)
            assert index.match(keys) == {sim.name: len(tokens.encode(prompt)) // 4}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{sim.url}/sim/reset") as r:
                    assert r.status in (200, 204)
            for _ in range(100):
                if not index.match(keys):
                    break
                await asyncio.sleep(0.02)
            assert index.match(keys) == {}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


from hypothesis import given
from hypothesis import strategies as st


@given(st.binary(max_size=200))
def test_any_payload_either_decodes_or_raises_the_decode_error(payload: bytes):
    from extproc.datalayer.kv_events import KVEventDecodeError

    try:
        decode_batch(payload)
    except KVEventDecodeError:
        pass


@given(st.lists(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.none(), st.lists(st.integers(0, 2**64 - 1), max_size=3)), max_size=8))
def test_malformed_events_inside_a_batch_are_skipped(fields: list):
    b = decode_batch(msgspec.msgpack.encode([1.0, [["BlockStored", *fields], {"type": "BlockRemoved", "block_hashes": fields}]]))
    assert len(b.events) + b.skipped == 2
