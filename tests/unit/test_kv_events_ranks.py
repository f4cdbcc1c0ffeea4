"""KV events of data-parallel ranks: each rank endpoint dials socketPort + its rank (llm-d's precise
producer), events on an endpoint's own socket are that endpoint's whatever DP rank the payload names
(llm-d#2233), ranks sharing one topic on the bound socket keep separate sequences, and a subscription
follows its endpoint's rank and label changes."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
import zmq
import zmq.asyncio

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import KV_EVENTS_PORT_LABEL, KVEventSubscriber, SequenceTracker, kv_events_address
from pickers.framework.endpoint import EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys

R0 = EndpointSpec("p-rank-0", "10.0.0.1", 8000, rank=0, dp_group="ns/p")
R3 = EndpointSpec("p-rank-3", "10.0.0.1", 8003, rank=3, dp_group="ns/p")


def stored(h: int, tokens: list[int]) -> dict:
    return {"type": "BlockStored", "block_hashes": [h], "parent_block_hash": None, "token_ids": tokens,
            "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None}  # fmt: skip


def message(seq: int, events: list, dp_rank: int | None, topic: bytes = b"kv@10.0.0.1:8000@m") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode([1.0, events, dp_rank])]


def test_the_default_port_is_offset_by_the_rank():
    assert kv_events_address(R0, 5557) == "tcp://10.0.0.1:5557"
    assert kv_events_address(R3, 5557) == "tcp://10.0.0.1:5560"


def test_the_label_is_an_absolute_port_whatever_the_rank():
    labelled = EndpointSpec("x", "10.0.0.1", 8003, labels={KV_EVENTS_PORT_LABEL: "6000"}, rank=3)
    assert kv_events_address(labelled, 5557) == "tcp://10.0.0.1:6000"
    assert kv_events_address(labelled, None) == "tcp://10.0.0.1:6000"


def test_no_default_port_means_no_subscription_for_unlabelled_ranks():
    assert kv_events_address(R3, None) is None


@pytest.mark.parametrize("label", ["x", "0", "70000", "-1", "5557.0"])
def test_a_label_that_is_not_a_port_subscribes_nowhere(label: str, caplog):
    assert kv_events_address(EndpointSpec("x", "h", 1, labels={KV_EVENTS_PORT_LABEL: label}), 5557) is None
    assert "is not a port" in caplog.text


def test_a_rank_past_the_last_port_subscribes_nowhere(caplog):
    # llm-d refuses the same (invalid KV-events ZMQ port, #1242)
    assert kv_events_address(EndpointSpec("x", "h", 1, rank=1), 65535) is None
    assert "65536 (socketPort 65535 + rank 1)" in caplog.text


def _subscriber(specs: list[EndpointSpec]) -> tuple[Datastore, KVBlockIndex, KVEventSubscriber]:
    ds = Datastore()
    ds.set_endpoints(specs)
    index = KVBlockIndex()
    return ds, index, KVEventSubscriber(ds, index)


def test_events_on_an_endpoints_socket_are_its_own_whatever_dp_rank_the_payload_names():
    # rank 3 of a worker pod whose group starts at global rank 8: vLLM stamps 11 on its batches
    _, index, sub = _subscriber([R0, R3])
    sub.handle_message(R3.address, message(0, [stored(1, [1, 2, 3, 4])], dp_rank=11), SequenceTracker())
    assert index.match(request_keys([1, 2, 3, 4], 4, 1)) == {R3.address: 1}
    assert sum(sub.resets.values()) == 0


def test_bound_socket_ranks_sharing_a_topic_keep_their_own_sequences():
    """vLLM's topic is one string for all ranks of an engine: on the bound socket their messages
    interleave under one topic, each rank numbering its own from 0."""
    _, index, sub = _subscriber([R0])
    sub.handle_bound_message(message(0, [stored(1, [1, 2, 3, 4])], dp_rank=0))
    sub.handle_bound_message(message(0, [stored(2, [5, 6, 7, 8])], dp_rank=1))
    sub.handle_bound_message(message(1, [], dp_rank=0))
    sub.handle_bound_message(message(1, [], dp_rank=1))
    assert sub.gaps == 0 and sum(sub.resets.values()) == 0
    assert index.blocks_of(R0.address) == 2  # the topic names one endpoint: both ranks' blocks are its


def test_bound_socket_still_sees_a_gap_within_one_ranks_stream():
    _, index, sub = _subscriber([R0])
    sub.handle_bound_message(message(0, [stored(1, [1, 2, 3, 4])], dp_rank=1))
    sub.handle_bound_message(message(2, [], dp_rank=1))
    assert sub.gaps == 1 and index.blocks_of(R0.address) == 0


def test_bound_socket_payloads_that_do_not_decode_are_counted_but_apply_nothing():
    _, index, sub = _subscriber([R0])
    sub.handle_bound_message([b"kv@10.0.0.1:8000@m", (0).to_bytes(8, "big"), b"\x01garbage"])
    assert sub.messages == 1 and index.blocks_of(R0.address) == 0


class _Sync:
    """A subscriber whose per-endpoint tasks are recorded instead of opening sockets."""

    def __init__(self, specs: list[EndpointSpec], default_port: int | None = 5557) -> None:
        self.ds = Datastore()
        self.ds.set_endpoints(specs)
        self.index = KVBlockIndex()
        self.sub = KVEventSubscriber(self.ds, self.index, default_port=default_port)
        self.dialed: list[tuple[str, str]] = []

        async def follow(address: str, zmq_address: str) -> None:
            self.dialed.append((address, zmq_address))
            await asyncio.Event().wait()

        self.sub._follow = follow  # type: ignore[method-assign]
        self.sub._ctx = object()  # as inside run()

    async def settle(self) -> dict[str, str]:
        await asyncio.sleep(0)
        return dict(self.sub._dialed)

    async def close(self) -> None:
        for t in list(self.sub._tasks.values()):
            t.cancel()
        await asyncio.gather(*self.sub._tasks.values(), return_exceptions=True)


async def test_each_rank_endpoint_gets_its_own_subscription():
    s = _Sync([R0, R3])
    try:
        s.sub._sync()
        assert await s.settle() == {R0.address: "tcp://10.0.0.1:5557", R3.address: "tcp://10.0.0.1:5560"}
    finally:
        await s.close()


async def test_a_rank_change_redials_and_drops_what_the_old_publisher_said():
    s = _Sync([R0, R3])
    try:
        s.sub._sync()
        await s.settle()
        s.index.block_stored(R3.address, [1], None, [1, 2, 3, 4], 4)
        moved = EndpointSpec(R3.name, R3.host, R3.port, rank=1, dp_group=R3.dp_group)  # targetPorts reordered
        s.ds.set_endpoints([R0, moved])
        assert await s.settle() == {R0.address: "tcp://10.0.0.1:5557", R3.address: "tcp://10.0.0.1:5558"}
        assert s.index.blocks_of(R3.address) == 0 and s.sub.resets["publisher_changed"] == 1
        assert s.dialed[-1] == (R3.address, "tcp://10.0.0.1:5558")
    finally:
        await s.close()


async def test_a_spec_change_that_keeps_the_publisher_keeps_the_subscription():
    s = _Sync([R0])
    try:
        s.sub._sync()
        await s.settle()
        task = s.sub._tasks[R0.address]
        s.ds.set_endpoints([EndpointSpec(R0.name, R0.host, R0.port, labels={"x": "y"}, rank=0, dp_group="other")])
        await s.settle()
        assert s.sub._tasks[R0.address] is task and len(s.dialed) == 1
    finally:
        await s.close()


async def test_a_label_added_later_moves_the_subscription_to_the_labelled_port():
    s = _Sync([R0])
    try:
        s.sub._sync()
        await s.settle()
        s.ds.set_endpoints([EndpointSpec(R0.name, R0.host, R0.port, labels={KV_EVENTS_PORT_LABEL: "7000"})])
        assert await s.settle() == {R0.address: "tcp://10.0.0.1:7000"}
    finally:
        await s.close()


async def test_an_endpoint_whose_publisher_goes_away_drops_its_entries():
    s = _Sync([R3])
    try:
        s.sub._sync()
        await s.settle()
        s.index.block_stored(R3.address, [1], None, [1, 2, 3, 4], 4)
        bad = EndpointSpec(R3.name, R3.host, R3.port, labels={KV_EVENTS_PORT_LABEL: "nope"}, rank=3)
        s.ds.set_endpoints([bad])
        assert await s.settle() == {}
        assert s.index.blocks_of(R3.address) == 0  # no events will ever correct them
    finally:
        await s.close()


async def test_one_publisher_named_by_several_endpoints_feeds_only_the_first(caplog):
    """A pod label is shared by all the pod's ranks: an absolute port there names one socket for all."""
    label = {KV_EVENTS_PORT_LABEL: "6000"}
    a = EndpointSpec("p-rank-0", "10.0.0.1", 8000, labels=label, rank=0)
    b = EndpointSpec("p-rank-1", "10.0.0.1", 8001, labels=label, rank=1)
    s = _Sync([a, b])
    try:
        s.sub._sync()
        assert await s.settle() == {a.address: "tcp://10.0.0.1:6000"}
        assert "both name the publisher tcp://10.0.0.1:6000" in caplog.text
    finally:
        await s.close()


def _pub_pair(ctx: zmq.asyncio.Context) -> tuple[int, zmq.asyncio.Socket, zmq.asyncio.Socket]:
    """Two PUB sockets on consecutive free loopback ports (base, base + 1)."""
    for _ in range(50):
        base = random.randint(20_000, 60_000)
        first = ctx.socket(zmq.PUB)
        try:
            first.bind(f"tcp://127.0.0.1:{base}")
        except zmq.ZMQError:
            first.close(linger=0)
            continue
        second = ctx.socket(zmq.PUB)
        try:
            second.bind(f"tcp://127.0.0.1:{base + 1}")
        except zmq.ZMQError:
            first.close(linger=0)
            second.close(linger=0)
            continue
        return base, first, second
    raise RuntimeError("no two consecutive free ports")


async def test_two_ranks_of_a_pod_over_real_sockets_fill_their_own_entries():
    ctx = zmq.asyncio.Context()
    base, pub0, pub1 = _pub_pair(ctx)
    r0 = EndpointSpec("p-rank-0", "127.0.0.1", 18000, rank=0, dp_group="g")
    r1 = EndpointSpec("p-rank-1", "127.0.0.1", 18001, rank=1, dp_group="g")
    ds = Datastore()
    index = KVBlockIndex()
    sub = KVEventSubscriber(ds, index, default_port=base)
    task = asyncio.create_task(sub.run())
    ds.set_endpoints([r0, r1])
    keys0, keys1 = request_keys([1, 2, 3, 4], 4, 1), request_keys([5, 6, 7, 8], 4, 1)
    try:
        for seq in range(200):  # PUB drops until the SUB has joined: repeat until both landed
            # both ranks stamp the same topic (vLLM's is per engine, not per rank)
            await pub0.send_multipart(message(seq, [stored(1, [1, 2, 3, 4])], dp_rank=0, topic=b"kv@127.0.0.1:18000@m"))
            await pub1.send_multipart(message(seq, [stored(2, [5, 6, 7, 8])], dp_rank=1, topic=b"kv@127.0.0.1:18000@m"))
            await asyncio.sleep(0.02)
            if index.match(keys0) and index.match(keys1):
                break
        assert index.match(keys0) == {r0.address: 1}
        assert index.match(keys1) == {r1.address: 1}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub0.close(linger=0)
        pub1.close(linger=0)
        ctx.destroy(linger=0)
