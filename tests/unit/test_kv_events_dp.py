"""KV events under newer llm-d's data-parallel settings: rank-granular identity (kvEventsConfig.
servingPortBase + dataParallelSizeLocal: a batch stamped with DP rank R is the endpoint
host:(servingPortBase + R % local), R kept as its global rank), range dialing
(podDiscoveryConfig.dataParallelSizeTotal: every pod at socketPort + i for i < total), and SGLang's
batches (decoded alike, their rank not read)."""

from __future__ import annotations

import asyncio

import msgspec
import zmq
import zmq.asyncio

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import (
    KVEventSubscriber,
    RankAttribution,
    SequenceTracker,
)
from pickers.framework.endpoint import EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys
from tests.unit.test_producers import load

# two pods of one DP group of 4 (2 ranks a pod), each rank serving on 8000 + local rank
A0 = EndpointSpec("a-rank-0", "10.0.0.1", 8000, rank=0, dp_group="ns/g")
A1 = EndpointSpec("a-rank-1", "10.0.0.1", 8001, rank=1, dp_group="ns/g")
B0 = EndpointSpec("b-rank-0", "10.0.0.2", 8000, rank=0, dp_group="ns/g")
B1 = EndpointSpec("b-rank-1", "10.0.0.2", 8001, rank=1, dp_group="ns/g")
TOKENS = [1, 2, 3, 4]
KEYS = request_keys(TOKENS, 4, 1)


def stored(h: int) -> list:
    return ["BlockStored", [h], None, TOKENS, 4]


def message(seq: int, events: list, dp_rank: int | None, topic: bytes = b"kv@10.0.0.1:8000@m") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode([1.0, events, dp_rank])]


def subscriber(specs: list[EndpointSpec], **kw: object) -> tuple[Datastore, KVBlockIndex, KVEventSubscriber]:
    ds = Datastore()
    ds.set_endpoints(specs)
    index = KVBlockIndex()
    return ds, index, KVEventSubscriber(ds, index, **kw)  # type: ignore[arg-type]


BY_RANK = RankAttribution(serving_port_base=8000, dp_size_local=2)


def test_by_rank_a_batch_is_the_endpoint_its_rank_names_on_the_host_it_came_from():
    # pod b's publisher of global rank 3 is dialed for b-rank-0 (its rank index is not the engine's)
    _, index, sub = subscriber([A0, A1, B0, B1], attribution=BY_RANK)
    sub.handle_message(B0.address, message(0, [stored(1)], dp_rank=3), SequenceTracker())
    assert index.match(KEYS) == {B1.address: 1}  # 8000 + 3 % 2
    assert index.global_dp_rank(B1.address) == 3 and index.global_dp_rank(B0.address) is None


def test_by_rank_a_batch_without_a_rank_keeps_the_endpoint_it_came_for():
    _, index, sub = subscriber([A0, A1], attribution=BY_RANK)
    sub.handle_message(A1.address, message(0, [stored(1)], dp_rank=None), SequenceTracker())
    assert index.match(KEYS) == {A1.address: 1} and index.global_dp_rank(A1.address) is None


def test_without_a_serving_port_base_the_rank_changes_nothing():
    """llm-d's default: pod-granular identity, no rank recorded (its events are the endpoint's own)."""
    _, index, sub = subscriber([A0, A1])
    sub.handle_message(A0.address, message(0, [stored(1)], dp_rank=1), SequenceTracker())
    assert index.match(KEYS) == {A0.address: 1} and index.global_dp_rank(A1.address) is None


def test_by_rank_an_endpoint_not_in_the_pool_gets_nothing(caplog):
    _, index, sub = subscriber([A0], attribution=BY_RANK)
    sub.handle_message(A0.address, message(0, [stored(1)], dp_rank=1), SequenceTracker())
    sub.handle_message(A0.address, message(1, [stored(2)], dp_rank=1), SequenceTracker())
    assert index.match(KEYS) == {} and sub.unattributed == 2
    assert caplog.text.count("10.0.0.1:8001, which is not an endpoint of the pool") == 1


def test_by_rank_a_gap_resets_the_endpoint_the_rank_names():
    _, index, sub = subscriber([A0, A1], attribution=BY_RANK)
    seq = SequenceTracker()
    sub.handle_message(A0.address, message(0, [stored(1)], dp_rank=1), seq)
    assert index.blocks_of(A1.address) == 1
    sub.handle_message(A0.address, message(5, [], dp_rank=1), seq)
    assert index.blocks_of(A1.address) == 0 and sub.gaps == 1


def test_a_disconnect_resets_every_endpoint_the_stream_fed():
    _, index, sub = subscriber([A0, A1], attribution=BY_RANK)
    seq = SequenceTracker()
    sub.handle_message(A0.address, message(0, [stored(1)], dp_rank=1), seq)
    sub.handle_message(A0.address, message(1, [stored(2)], dp_rank=None), seq)
    assert index.blocks_of(A0.address) == 1 and index.blocks_of(A1.address) == 1
    sub._reset_stream(A0.address, "disconnected")
    assert index.blocks_of(A0.address) == index.blocks_of(A1.address) == 0 and sub.resets["disconnected"] == 2


def test_a_range_stream_goes_by_rank_on_its_pod():
    _, index, sub = subscriber([A0, A1, B0, B1], attribution=BY_RANK, dp_size_total=4)
    sub.handle_message("10.0.0.2#dp-2", message(0, [stored(1)], dp_rank=2, topic=b"kv@10.0.0.2:8000@m"), SequenceTracker())
    assert index.match(KEYS) == {B0.address: 1} and index.global_dp_rank(B0.address) == 2


def test_a_range_stream_without_identity_by_rank_goes_to_its_topics_endpoint():
    """llm-d without servingPortBase: the topic names the pod (its ranks collapse onto that endpoint)."""
    _, index, sub = subscriber([A0, A1], dp_size_total=2)
    sub.handle_message("10.0.0.1#dp-1", message(0, [stored(1)], dp_rank=1), SequenceTracker())
    assert index.match(KEYS) == {A0.address: 1}
    sub.handle_message("10.0.0.1#dp-1", message(1, [stored(2)], dp_rank=1, topic=b"no-topic"), SequenceTracker())
    assert sub.unknown_sources == 1


def test_the_bound_socket_goes_by_rank_on_the_topics_host():
    _, index, sub = subscriber([A0, A1], attribution=BY_RANK, per_endpoint=False)
    sub.handle_bound_message(message(0, [stored(1)], dp_rank=1))
    assert index.match(KEYS) == {A1.address: 1} and index.global_dp_rank(A1.address) == 1
    sub.handle_bound_message(message(0, [stored(2)], dp_rank=None, topic=b"kv@10.0.0.9:8000@m"))
    assert sub.unknown_sources == 1


def test_sglang_batches_decode_alike_and_their_rank_is_not_read():
    """SGLang's events: the same positional arrays, trailing optional fields left out or extra_keys
    added; llm-d's SGLang adapter drops the batch's DP rank, so identity by rank never applies."""
    _, index, sub = subscriber([A0, A1], attribution=BY_RANK, engine="sglang")
    events = [["BlockStored", [7], None, TOKENS, 4, None, "GPU", None, [[1, 2]]], ["BlockRemoved", [99]]]
    sub.handle_message(A0.address, message(0, events, dp_rank=1), SequenceTracker())
    assert index.match(KEYS) == {A0.address: 1} and index.global_dp_rank(A1.address) is None


class _Recorded:
    def __init__(self, specs: list[EndpointSpec], **kw: object) -> None:
        self.ds, self.index, self.sub = subscriber(specs, default_port=5557, **kw)

        async def follow(key: str, zmq_address: str) -> None:
            await asyncio.Event().wait()

        self.sub._follow = follow  # type: ignore[method-assign]
        self.sub._ctx = object()

    async def dialed(self) -> dict[str, str]:
        self.sub._sync()
        await asyncio.sleep(0)
        return dict(self.sub._dialed)

    async def close(self) -> None:
        for t in list(self.sub._tasks.values()):
            t.cancel()
        await asyncio.gather(*self.sub._tasks.values(), return_exceptions=True)


async def test_with_a_total_every_pod_is_dialed_at_each_port_of_the_range():
    """Publishers bind socketPort + their GLOBAL rank: pod b's ranks 2 and 3 are at 5559 and 5560."""
    s = _Recorded([A0, A1, B0], dp_size_total=4)
    try:
        dialed = await s.dialed()
        assert dialed == {f"{h}#dp-{i}": f"tcp://{h}:{5557 + i}" for h in ("10.0.0.1", "10.0.0.2") for i in range(4)}
        s.ds.set_endpoints([A0, A1])  # pod b leaves
        assert set(await s.dialed()) == {f"10.0.0.1#dp-{i}" for i in range(4)}
    finally:
        await s.close()


async def test_without_a_total_each_endpoint_dials_socket_port_plus_its_rank():
    s = _Recorded([A0, A1])
    try:
        assert await s.dialed() == {A0.address: "tcp://10.0.0.1:5557", A1.address: "tcp://10.0.0.1:5558"}
    finally:
        await s.close()


async def test_a_rank_of_another_pod_reaches_its_endpoint_over_zmq():
    """Real sockets: the engine of global rank 2 publishes at socketPort + 2 of its pod, which no
    endpoint's rank index names; the range subscription receives it and identity by rank files it
    under host:(servingPortBase + 2 % 2)."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    r0 = EndpointSpec("p-rank-0", "127.0.0.1", 18000, rank=0)
    r1 = EndpointSpec("p-rank-1", "127.0.0.1", 18001, rank=1)
    ds = Datastore()
    ds.set_endpoints([r0, r1])
    index = KVBlockIndex()
    sub = KVEventSubscriber(ds, index, default_port=port - 2, dp_size_total=4,
                            attribution=RankAttribution(18000, 2), topic_filter="kv@")  # fmt: skip
    task = asyncio.create_task(sub.run())
    try:
        for seq in range(200):  # resend until the SUB has joined (ZMQ's slow joiner)
            await pub.send_multipart(message(seq, [stored(seq + 1)], dp_rank=2, topic=b"kv@127.0.0.1:18000@m"))
            await asyncio.sleep(0.02)
            if index.match(KEYS):
                break
        assert index.match(KEYS) == {r0.address: 1}
        assert index.global_dp_rank(r0.address) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.close(linger=0)
        ctx.destroy(linger=0)


PRECISE = (
    "plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
    "- type: precise-prefix-cache-producer\n  parameters:\n    kvEventsConfig: {kv}\n- type: max-score-picker\n"
)


def test_the_producer_reads_llm_ds_data_parallel_settings():
    cfg = load(PRECISE.replace("{kv}", "{servingPortBase: 8000, dataParallelSizeLocal: 8, podDiscoveryConfig: "
                                      "{socketPort: 5557, dataParallelSizeTotal: 16}}"))  # fmt: skip
    p = cfg.plugins["precise-prefix-cache-producer"]
    assert (p.serving_port_base, p.dp_size_local, p.dp_size_total, p.engine) == (8000, 8, 16, "vllm")
    kv = cfg.plugin_parameters["precise-prefix-cache-producer"]["kvEventsConfig"]
    assert (kv["servingPortBase"], kv["dataParallelSizeLocal"], kv["podDiscoveryConfig"]["dataParallelSizeTotal"]) == (8000, 8, 16)
    assert not cfg.warnings


def test_data_parallel_settings_that_change_nothing_load_with_a_warning():
    said = " | ".join(load(PRECISE.replace("{kv}", "{dataParallelSizeLocal: 8}")).warnings)
    assert "dataParallelSizeLocal has no effect without servingPortBase" in said
    said = " | ".join(load(PRECISE.replace("{kv}", "{engineType: sglang, servingPortBase: 8000}")).warnings)
    assert "servingPortBase has no effect with engineType sglang" in said
    said = " | ".join(load(PRECISE.replace("{kv}", "{discoverPods: false, zmqEndpoint: 'tcp://*:5557', "
                                                   "podDiscoveryConfig: {dataParallelSizeTotal: 4}}")).warnings)  # fmt: skip
    assert "dataParallelSizeTotal has no effect with discoverPods: false" in said


def test_engine_type_sglang_loads():
    cfg = load(PRECISE.replace("{kv}", "{engineType: sglang}"))
    assert cfg.plugins["precise-prefix-cache-producer"].engine == "sglang" and not cfg.warnings
