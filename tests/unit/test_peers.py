"""Active-active replicas (extproc.peers): the journal of local picks, peers' load on the datastore, and
the exchange itself between two PeerSync servers on loopback (real gRPC, no Envoy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.peers.journal import JournalEntry, SharedPrefixIndex, new_journal
from extproc.peers.latency import Kind, Observation, SharedLatencyModel, new_observation_log
from extproc.peers.load import Load, PeerLoad
from extproc.peers.ring import Applied
from extproc.peers.peerpb import peer_pb2 as pb
from extproc.peers.peerpb import peer_pb2_grpc as pb_grpc
from extproc.peers.sync import PROTOCOL_VERSION, PeerOptions, PeerSync, parse_peers
from pickers.framework.endpoint import EndpointSpec

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"


def _datastore() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("e1", "10.0.0.1", 8000), EndpointSpec("e2", "10.0.0.2", 8000)])
    return ds


# -- the numbered rings (journal, observation log) and the receiver's count -----------------------------


def _obs(i: int, address: str = E1) -> Observation:
    return Observation(Kind.TTFT, address, 1000 + i, 2, 0.1)


def _entry(address: str, hashes: list[int], capacity: int = 0) -> JournalEntry:
    return JournalEntry(address, hashes, capacity)


def test_journal_reads_from_a_cursor_in_order() -> None:
    j = new_journal(100)
    j.append(_entry(E1, [1, 2]))
    j.append(_entry(E2, [3], 5))
    read = j.read(0, 100)
    assert [(e.address, list(e.hashes), e.capacity) for e in read.items] == [(E1, [1, 2], 0), (E2, [3], 5)]
    assert (read.first_seq, read.cursor, read.dropped) == (0, 2, 0)
    assert j.read(read.cursor, 100).items == []


def test_journal_is_bounded_by_blocks_and_tells_a_late_reader_what_it_missed() -> None:
    j = new_journal(4)
    for h in range(5):
        j.append(_entry(E1, [h, h + 100]))
    assert j.weight <= 4 and len(j) == 2 and j.overwritten == 3
    read = j.read(0, 100)
    assert (read.dropped, read.first_seq) == (3, 3) and [e.hashes[0] for e in read.items] == [3, 4]


def test_journal_keeps_a_record_larger_than_its_bound() -> None:
    j = new_journal(2)
    j.append(_entry(E1, [1, 2, 3]))
    assert len(j) == 1 and j.read(0, 1).items[0].hashes == [1, 2, 3]


def test_journal_read_stops_at_the_block_budget_but_returns_at_least_one_entry() -> None:
    j = new_journal(100)
    for h in range(3):
        j.append(_entry(E1, [h] * 10))
    first = j.read(0, 15)
    assert len(first.items) == 1
    assert len(j.read(first.cursor, 25).items) == 2


def test_a_ring_refuses_a_size_below_one_naming_it() -> None:
    with pytest.raises(ValueError, match="journal size in blocks: expected at least 1"):
        new_journal(0)
    with pytest.raises(ValueError, match="observation log size: expected at least 1"):
        new_observation_log(0)


def test_observation_log_reads_from_a_cursor_and_tells_a_late_reader_what_it_missed() -> None:
    log = new_observation_log(3)
    for i in range(5):
        log.append(_obs(i))
    assert (log.first_seq, log.next_seq, len(log)) == (2, 5, 3)
    r = log.read(0, 2)
    assert (r.first_seq, r.cursor, r.dropped, [o.prefill_tokens for o in r.items]) == (2, 4, 2, [1002, 1003])
    r = log.read(r.cursor, 10)
    assert (r.first_seq, r.cursor, r.dropped, [o.prefill_tokens for o in r.items]) == (4, 5, 0, [1004])
    assert log.read(5, 10).items == []


def test_the_receivers_count_skips_what_a_replay_repeats() -> None:
    a = Applied()
    assert a.new(0, 5) == 0  # 0..4 new
    assert a.new(0, 7) == 5  # a replay from 0: 5 already applied, 5..6 new
    assert a.new(10, 2) == 0  # a gap (the sender's ring overwrote 7..9): nothing to skip
    assert a.new(3, 4) == 4  # entirely old
    assert a.new(12, 0) == 0 and a.next_seq == 12


def test_shared_index_journals_local_picks_but_not_peer_ones() -> None:
    index = SharedPrefixIndex()
    index.record(E1, [1, 2, 3], 100)
    index.apply_peer(E2, [1, 2], 0)
    assert index.match([1, 2, 3]) == {E1: 3, E2: 2}
    assert [e.address for e in index.journal.read(0, 100).items] == [E1]
    assert index.peer_records == 1


# -- peers' load --------------------------------------------------------------------------------------


def test_peer_load_adds_to_the_endpoints_and_own_load_excludes_it() -> None:
    ds = _datastore()
    load = PeerLoad(ds)
    ep = ds.get(E1)
    assert ep is not None
    ds.acquire(ep, 10, 4)
    load.update("b", {E1: Load(3, 300, 200, 50)})
    assert (ep.in_flight, ep.in_flight_tokens, ep.in_flight_prefill_tokens, ep.in_flight_output_tokens) == (4, 310, 204, 50)
    assert load.own() == [(E1, Load(1, 10, 4, 0))]


def test_a_peers_prefill_coming_off_lowers_the_prefill_queue_only() -> None:
    ds = _datastore()
    load = PeerLoad(ds)
    ep = ds.get(E1)
    assert ep is not None
    load.update("b", {E1: Load(1, 300, 200)})
    load.update("b", {E1: Load(1, 300, 0)})
    assert (ep.in_flight, ep.in_flight_tokens, ep.in_flight_prefill_tokens) == (1, 300, 0)


def test_a_new_snapshot_replaces_the_last_and_forgetting_removes_it() -> None:
    ds = _datastore()
    load = PeerLoad(ds)
    load.update("b", {E1: Load(3, 300), E2: Load(1, 10)})
    load.update("b", {E1: Load(1, 100)})
    e1, e2 = ds.get(E1), ds.get(E2)
    assert e1 is not None and e2 is not None
    assert (e1.in_flight, e2.in_flight) == (1, 0)
    load.update("c", {E1: Load(2, 20)})
    assert e1.in_flight == 3
    load.forget("b")
    assert (e1.in_flight, e1.in_flight_tokens) == (2, 20)


def test_a_quiet_peer_expires() -> None:
    ds = _datastore()
    load = PeerLoad(ds, ttl=2.0)
    load.update("b", {E1: Load(3, 300)}, now=100.0)
    load.heard("b", now=101.5)
    assert load.expire(now=103.0) == []
    assert load.expire(now=104.0) == ["b"]
    e1 = ds.get(E1)
    assert e1 is not None and e1.in_flight == 0


def test_load_follows_an_endpoint_that_left_and_came_back() -> None:
    ds = _datastore()
    load = PeerLoad(ds)
    ds.on_membership_change(lambda added, removed: load.reconcile_all())
    load.update("b", {E1: Load(2, 20)})
    ds.set_endpoints([EndpointSpec("e2", "10.0.0.2", 8000)])
    ds.set_endpoints([EndpointSpec("e1", "10.0.0.1", 8000), EndpointSpec("e2", "10.0.0.2", 8000)])
    e1 = ds.get(E1)
    assert e1 is not None and (e1.in_flight, e1.in_flight_tokens) == (2, 20)
    assert load.own() == []


# -- the latency observations ----------------------------------------------------------------------


def test_shared_latency_model_logs_its_own_observations_but_not_a_peers_or_invalid_ones() -> None:
    ds = _datastore()
    ep = ds.get(E1)
    assert ep is not None
    m = SharedLatencyModel()
    m.observe_ttft(ep, 2000, 4, 0.25)
    m.observe_tpot(ep, 4, 0.02)
    m.observe_ttft(ep, 2000, 4, float("inf"))  # taught nothing: not shared either
    m.observe_tpot(ep, 4, 0.0)
    assert [(o.kind, o.address, o.prefill_tokens, o.batch, o.seconds) for o in m.log.read(0, 10).items] == [
        (Kind.TTFT, E1, 2000, 4, 0.25), (Kind.TPOT, E1, 0, 4, 0.02),
    ]  # fmt: skip
    m.apply_peer(ep, Observation(Kind.TTFT, E1, 100, 1, 0.05))
    m.apply_peer(ep, Observation(Kind.TPOT, E1, 0, 1, 0.01))
    assert m.log.next_seq == 2 and m.peer_observations == 2
    assert ep.latency.ttft is not None and ep.latency.ttft.n == 2
    assert ep.latency.tpot is not None and ep.latency.tpot.n == 2


def _slow_server_ttft(prefill_tokens: int, batch: int) -> float:
    return 0.05 + prefill_tokens / 2000.0 + 0.002 * batch  # a CPU-class server, far from the GPU prior


async def test_a_replicas_observations_train_its_peers_fits(pair: tuple[_Replica, _Replica]) -> None:
    a, b = pair
    ep_a, ep_b = a.datastore.get(E1), b.datastore.get(E1)
    assert ep_a is not None and ep_b is not None
    for i in range(60):
        u, batch = 500 + 97 * (i % 20), 1 + i % 7
        a.latency.observe_ttft(ep_a, u, batch, _slow_server_ttft(u, batch))
        a.latency.observe_tpot(ep_a, batch, 0.03 + 0.001 * batch)
    await _until(lambda: b.sync.stats.observations_applied == 120)
    assert ep_b.latency.ttft is not None and ep_b.latency.ttft.n == 60
    # b predicts what a learned: its fit of E1 is a's, though b served none of E1's responses
    assert b.latency.ttft(ep_b, 1500, queued=0, batch=2) == pytest.approx(a.latency.ttft(ep_a, 1500, queued=0, batch=2), rel=1e-6)
    assert b.latency.ttft(ep_b, 1500, queued=0, batch=2) == pytest.approx(_slow_server_ttft(1500, 2), rel=0.1)
    assert b.latency.tpot(ep_b, batch=3) == pytest.approx(a.latency.tpot(ep_a, batch=3), rel=1e-6)
    assert b.latency.log.next_seq == 0  # b passes nothing on
    assert b.sync.status()["observations_heard"] == {"a": 120}


async def test_a_replayed_update_is_counted_once_and_an_unknown_endpoint_or_kind_is_skipped(pair: tuple[_Replica, _Replica]) -> None:
    _, b = pair
    ep = b.datastore.get(E2)
    assert ep is not None
    u = pb.Update(observation_seq=0)
    u.observations.add(kind=pb.Observation.TTFT, endpoint=E2, prefill_tokens=800, batch=1, seconds=0.4)
    u.observations.add(kind=pb.Observation.TPOT, endpoint="10.9.9.9:8000", batch=1, seconds=0.02)  # not in b's pool
    u.observations.add(kind=7, endpoint=E2, batch=1, seconds=0.02)  # a kind of a newer sender
    heard = b.sync._open("x", 7)
    b.sync._apply("x", heard, u, True)
    b.sync._apply("x", heard, u, True)  # a reconnect replays it
    st = b.sync.stats
    assert (st.observations_applied, st.observations_unknown, st.observations_repeated) == (1, 2, 3)
    assert ep.latency.ttft is not None and ep.latency.ttft.n == 1


async def test_a_restarted_replica_starts_with_its_peers_fits() -> None:
    a, b = _Replica("a"), _Replica("b")
    await a.start()
    ep_a = a.datastore.get(E1)
    assert ep_a is not None
    for i in range(20):
        a.latency.observe_ttft(ep_a, 1000 + i, 1, _slow_server_ttft(1000 + i, 1))  # before b (re)starts
    try:
        await b.start()
        a.sync.set_targets([b.address])
        ep_b = b.datastore.get(E1)
        assert ep_b is not None
        await _until(lambda: ep_b.latency.ttft is not None and ep_b.latency.ttft.n == 20)
        assert b.latency.view(ep_b)["source"] == "own"
    finally:
        await a.stop()
        await b.stop()


def test_parse_peers() -> None:
    assert parse_peers("a:1, b:2,a:1,") == ("a:1", "b:2")
    for bad in ("a", "a:", ":80", "a:0", "a:x", "a:70000"):
        with pytest.raises(ValueError, match="expected host:port"):
            parse_peers(bad)


# -- the exchange ---------------------------------------------------------------------------------------


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class _Replica:
    def __init__(self, name: str, digest: str = "d", port: int = 0) -> None:
        self.datastore = _datastore()
        self.index = SharedPrefixIndex()
        self.latency = SharedLatencyModel()
        self.sync = PeerSync(PeerOptions(port=port, bind_address="127.0.0.1", replica_id=name, ttl=2.0), self.index, self.datastore,
                             lambda: digest, self.latency)  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sync.port}"

    async def start(self) -> None:
        await self.sync.start()
        self.task = asyncio.create_task(self.sync.run())

    async def stop(self) -> None:
        await self.sync.stop()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[_Replica, _Replica]]:
    a, b = _Replica("a"), _Replica("b")
    await a.start()
    await b.start()
    a.sync.set_targets([b.address, a.address])  # a Service lists a replica itself too
    b.sync.set_targets([a.address])
    yield a, b
    await a.stop()
    await b.stop()


async def test_a_pick_on_one_replica_is_matched_on_the_other(pair: tuple[_Replica, _Replica]) -> None:
    a, b = pair
    a.index.record(E1, [11, 12, 13], 500)
    await _until(lambda: b.index.match([11, 12, 13]) == {E1: 3})
    b.index.record(E2, [21], 0)
    await _until(lambda: a.index.match([21]) == {E2: 1})


async def test_a_local_pick_made_before_a_peers_earlier_pick_arrived_counts_as_blind(pair: tuple[_Replica, _Replica]) -> None:
    a, b = pair
    b.index.record(E2, [31, 32])  # b picks E2 for prefix 31 now...
    a.index.record(E1, [31, 32], now=time.monotonic() - 10)  # ...a picked E1 for it 10 s ago (its age says so)
    b.index.record(E1, [41])
    a.index.record(E1, [41], now=time.monotonic() - 10)  # the same endpoint: blind, but no harm
    await _until(lambda: b.sync.stats.records_applied == 2)
    assert (b.sync.stats.blind_picks_split, b.sync.stats.blind_picks_same) == (1, 1)
    b.index.record(E2, [51], now=time.monotonic() - 10)  # b picked long before a (a's pick is a's blind pick, not b's)
    a.index.record(E1, [51])
    a.index.record(E1, [61])
    await _until(lambda: b.index.match([61]) == {E1: 1})
    b.index.record(E2, [61])  # after hearing a's pick: b knew it
    a.index.record(E1, [62])
    await _until(lambda: b.sync.stats.records_applied == 5)
    assert (b.sync.stats.blind_picks_split, b.sync.stats.blind_picks_same) == (1, 1)
    assert b.sync.status()["blind_picks_split"] == 1


def test_the_index_remembers_the_latest_local_pick_per_first_block_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extproc.peers.journal.RECENT_PICKS", 2)
    index = SharedPrefixIndex()
    index.record(E1, [1, 2], now=5.0)
    index.record(E2, [1, 3], now=6.0)
    index.apply_peer(E1, [7], 0)  # a peer's pick is not a local one
    assert index.latest_local(1) == (E2, 6.0) and index.latest_local(7) is None
    index.record(E1, [8], now=7.0)
    index.record(E1, [9], now=8.0)  # the third prefix: the oldest (1) is forgotten
    assert index.latest_local(1) is None and index.latest_local(9) == (E1, 8.0)
    assert [e.at for e in index.journal.read(0, 100).items] == [5.0, 6.0, 7.0, 8.0]


async def test_in_flight_load_is_shared_and_dropped_when_a_replica_stops(pair: tuple[_Replica, _Replica]) -> None:
    a, b = pair
    ep_a = a.datastore.get(E2)
    assert ep_a is not None
    a.datastore.acquire(ep_a, 100)
    ep_b = b.datastore.get(E2)
    assert ep_b is not None
    await _until(lambda: (ep_b.in_flight, ep_b.in_flight_tokens) == (1, 100))
    a.datastore.release(ep_a, 100)
    await _until(lambda: ep_b.in_flight == 0)
    a.datastore.acquire(ep_a, 7)
    await _until(lambda: ep_b.in_flight == 1)
    await a.stop()
    await _until(lambda: ep_b.in_flight == 0 and b.sync.load.peers == 0)


async def test_a_replica_finds_itself_in_its_peer_list_and_stops_dialling_it(pair: tuple[_Replica, _Replica]) -> None:
    a, _ = pair
    await _until(lambda: a.sync.status()["peers"][a.address]["self"])
    assert a.sync.status()["peers"][a.address]["connected"] is False


async def test_a_replica_that_starts_late_catches_up_from_the_journal() -> None:
    a, b = _Replica("a"), _Replica("b")
    await a.start()
    try:
        a.index.record(E1, [1, 2], 0)  # before b exists: a keeps serving on its own state
        await b.start()
        a.sync.set_targets([b.address])
        await _until(lambda: b.index.match([1, 2]) == {E1: 2})
        assert a.sync.status()["peers"][b.address]["connected"]
    finally:
        await a.stop()
        await b.stop()


async def test_a_peer_that_restarts_is_reached_again() -> None:
    a, b = _Replica("a"), _Replica("b")
    await a.start()
    await b.start()
    port = b.sync.port
    a.sync.set_targets([b.address])
    try:
        await _until(lambda: a.sync.status()["peers"][b.address]["connected"])
        await b.stop()
        await _until(lambda: not a.sync.status()["peers"][f"127.0.0.1:{port}"]["connected"])
        a.index.record(E1, [5, 6], 0)  # while b is down
        b = _Replica("b2", port=port)
        await b.start()
        await _until(lambda: b.index.match([5, 6]) == {E1: 2})
    finally:
        await a.stop()
        await b.stop()


async def test_blocks_of_a_peer_that_hashes_differently_are_not_applied_but_its_load_is() -> None:
    a, b = _Replica("a", digest="chars=64"), _Replica("b", digest="chars=256")
    await a.start()
    await b.start()
    a.sync.set_targets([b.address])
    try:
        ep = a.datastore.get(E1)
        assert ep is not None
        a.datastore.acquire(ep, 5)
        a.index.record(E1, [1], 0)
        ep_b = b.datastore.get(E1)
        assert ep_b is not None
        await _until(lambda: ep_b.in_flight == 1)
        await asyncio.sleep(0.2)
        assert b.index.match([1]) == {}
    finally:
        await a.stop()
        await b.stop()


async def test_records_for_an_unknown_endpoint_are_skipped(pair: tuple[_Replica, _Replica]) -> None:
    a, b = pair
    a.index.record("10.9.9.9:8000", [1], 0)
    a.index.record(E1, [2], 0)
    await _until(lambda: b.index.match([2]) == {E1: 1})
    assert b.index.match([1]) == {} and b.sync.stats.records_unknown == 1


async def _push(address: str, first: pb.Update) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.PeerSyncStub(ch).Push()
        await call.write(first)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value


async def test_a_stream_of_another_protocol_version_is_refused_with_both_versions(pair: tuple[_Replica, _Replica]) -> None:
    a, _ = pair
    err = await _push(a.address, pb.Update(hello=pb.Hello(version=PROTOCOL_VERSION + 1, replica_id="x")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"version {PROTOCOL_VERSION + 1}" in (err.details() or "") and f"version {PROTOCOL_VERSION}" in (err.details() or "")


async def test_a_stream_without_hello_is_refused(pair: tuple[_Replica, _Replica]) -> None:
    a, _ = pair
    err = await _push(a.address, pb.Update(load_snapshot=True))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in (err.details() or "")


async def test_a_hello_without_a_replica_id_is_refused(pair: tuple[_Replica, _Replica]) -> None:
    a, _ = pair
    err = await _push(a.address, pb.Update(hello=pb.Hello(version=PROTOCOL_VERSION)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "replica_id" in (err.details() or "")
    assert a.sync.stats.refused == 1


# -- a sender's incarnation: replays count once, a restart under the same id counts afresh --------------


class _Sender:
    """A raw peer stream to a replica, as a sender of some incarnation writes it."""

    def __init__(self, address: str, replica_id: str, incarnation: int) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = pb_grpc.PeerSyncStub(self.channel).Push()
        self.hello = pb.Hello(version=PROTOCOL_VERSION, replica_id=replica_id, config_digest="d", incarnation=incarnation)

    async def send(self, journal_first: int, blocks: list[int], obs_first: int, observations: int, load: int | None = None) -> None:
        """Blocks (one hash each, on E1) numbered from `journal_first`, observations from `obs_first`."""
        if self.hello is not None:
            await self.call.write(pb.Update(hello=self.hello))
            self.hello = None
        u = pb.Update(journal_next=journal_first + len(blocks), observation_seq=obs_first)
        for h in blocks:
            u.blocks.add(endpoint=E1, hashes=[h])
        for i in range(observations):
            u.observations.add(kind=pb.Observation.TTFT, endpoint=E1, prefill_tokens=1000 + obs_first + i, batch=1, seconds=0.1)
        if load is not None:
            u.load_snapshot = True
            u.load.add(endpoint=E1, requests=load, tokens=10 * load)
        await self.call.write(u)

    async def close(self) -> None:
        await self.call.done_writing()
        await self.call
        await self.channel.close()


def _received(r: _Replica) -> tuple[int, int, int, int]:
    st = r.sync.stats
    return st.records_applied, st.records_repeated, st.observations_applied, st.observations_repeated


async def test_a_reconnect_of_the_same_incarnation_replays_and_nothing_is_counted_twice() -> None:
    b = _Replica("b")
    await b.start()
    try:
        first = _Sender(b.address, "a", incarnation=5)
        await first.send(0, [1, 2, 3], 0, 3)
        await first.close()
        await _until(lambda: _received(b) == (3, 0, 3, 0) and not b.sync.status()["inbound"])
        again = _Sender(b.address, "a", incarnation=5)  # the same process, reconnected: it replays its rings
        await again.send(0, [1, 2, 3, 4], 0, 4)
        await _until(lambda: _received(b) == (4, 3, 4, 3))
        ep = b.datastore.get(E1)
        assert ep is not None and ep.latency.ttft is not None and ep.latency.ttft.n == 4
        assert b.index.peer_records == 4 and b.index.match([4]) == {E1: 1}
        assert b.sync.status()["heard_upto"] == {"a": 4} and b.sync.status()["observations_heard"] == {"a": 4}
        await again.close()
    finally:
        await b.stop()


async def test_a_peer_restarted_under_the_same_id_has_its_fresh_picks_and_observations_applied() -> None:
    b = _Replica("b")
    await b.start()
    try:
        old = _Sender(b.address, "a", incarnation=1)
        await old.send(0, list(range(100, 150)), 0, 50, load=3)
        await _until(lambda: _received(b) == (50, 0, 50, 0))
        ep = b.datastore.get(E1)
        assert ep is not None and ep.in_flight == 3
        # the process is killed; its stream is not yet seen to end when its successor (same id) connects
        new = _Sender(b.address, "a", incarnation=2)
        await new.send(0, [7, 8], 0, 2, load=1)
        await _until(lambda: _received(b) == (52, 0, 52, 0))
        assert b.index.match([8]) == {E1: 1} and ep.in_flight == 1  # the old process's load went with it
        await old.send(150, [9], 50, 5, load=9)  # what was still on its way from the old process: stale
        await new.send(2, [10], 2, 1, load=1)
        await _until(lambda: _received(b) == (53, 0, 53, 0))
        assert b.index.match([9]) == {} and ep.in_flight == 1
        assert b.sync.status()["observations_heard"] == {"a": 3} and b.sync.status()["heard_upto"] == {"a": 3}
        await old.close()
        assert ep.in_flight == 1  # the old stream's end does not take the new process's load
        await new.close()
        await _until(lambda: ep.in_flight == 0)
    finally:
        await b.stop()


async def test_a_sender_without_an_incarnation_is_counted_afresh_on_every_stream() -> None:
    b = _Replica("b")
    await b.start()
    try:
        for _ in range(2):
            older = _Sender(b.address, "a", incarnation=0)  # a build before Hello.incarnation
            await older.send(0, [1], 0, 2)
            await older.close()
        await _until(lambda: _received(b) == (2, 0, 4, 0))
    finally:
        await b.stop()


async def test_a_replica_restarted_with_the_same_replica_id_teaches_its_peer_again() -> None:
    a, b = _Replica("a"), _Replica("b")
    await b.start()
    await a.start()
    a.sync.set_targets([b.address])
    ep_a, ep_b = a.datastore.get(E1), b.datastore.get(E1)
    assert ep_a is not None and ep_b is not None
    try:
        for i in range(30):
            a.latency.observe_ttft(ep_a, 1000 + i, 1, 0.2)
        a.index.record(E1, [1, 2], 0)
        await _until(lambda: b.sync.stats.observations_applied == 30 and b.index.match([1, 2]) == {E1: 2})
        await a.stop()
        a = _Replica("a")  # `--replica-id a` again: its numbering starts at 0
        await a.start()
        a.sync.set_targets([b.address])
        ep_a = a.datastore.get(E1)
        assert ep_a is not None
        for i in range(5):
            a.latency.observe_ttft(ep_a, 2000 + i, 1, 0.2)
        a.index.record(E2, [3], 0)
        await _until(lambda: b.sync.stats.observations_applied == 35 and b.index.match([3]) == {E2: 1})
        assert b.sync.stats.observations_repeated == 0 and b.sync.stats.records_repeated == 0
        assert b.sync.status()["observations_heard"] == {"a": 5}
    finally:
        await a.stop()
        await b.stop()


# -- the flags -------------------------------------------------------------------------------------------


def test_epp_serve_peer_flags_become_peer_options() -> None:
    from extproc.cli.main import _peer_options, build_parser

    args = build_parser().parse_args(["serve", "--peers", "10.0.0.7:9004,10.0.0.8:9004", "--peer-port", "9104", "--replica-id", "r1"])
    opts = _peer_options(args)
    assert opts is not None and opts.peers == ("10.0.0.7:9004", "10.0.0.8:9004") and opts.port == 9104 and opts.replica_id == "r1"
    assert _peer_options(build_parser().parse_args(["serve"])) is None  # not sharing: nothing imported


def test_a_bad_peer_is_refused_naming_the_flag_and_the_entry() -> None:
    from extproc.cli.main import _peer_options, build_parser
    from pickers.framework.errors import ConfigError

    with pytest.raises(ConfigError, match="10.0.0.7") as info:
        _peer_options(build_parser().parse_args(["serve", "--peers", "10.0.0.7"]))
    assert "--peers" in str(info.value)


def test_peers_and_leader_election_are_refused_together() -> None:
    from extproc.kubernetes.runtime import KubernetesOptions
    from extproc.server.runner import EppServer, ServeOptions
    from pickers.framework.errors import ConfigError

    opts = ServeOptions(peers=PeerOptions(peers=("127.0.0.1:9004",)), kubernetes=KubernetesOptions(leader_election=True))
    with pytest.raises(ConfigError, match="leader election"):
        EppServer(opts)


def test_a_sharing_server_journals_its_picks_and_names_its_block_size() -> None:
    from extproc.server.runner import EppServer, ServeOptions

    server = EppServer(ServeOptions(peers=PeerOptions(peers=("127.0.0.1:9004",)), strategy="default"))
    assert isinstance(server.prefix_index, SharedPrefixIndex)
    assert isinstance(server.latency, SharedLatencyModel)
    assert server._block_digest() == "xxh64-chain/chars=64"
    alone = EppServer(ServeOptions())
    assert not isinstance(alone.prefix_index, SharedPrefixIndex)
    assert not isinstance(alone.latency, SharedLatencyModel)


@pytest.mark.parametrize("argv,why", [(["--replicas", "0"], "at least 1"), (["--no-sharing"], "only with --replicas 2")])
def test_epp_up_refuses_bad_replica_options_before_starting_anything(argv: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.cli.main import main

    assert main(["up", *argv]) == 2
    assert why in capsys.readouterr().err
