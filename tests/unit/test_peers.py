"""Active-active replicas (extproc.peers): the journal of local picks, peers' load on the datastore, and
the exchange itself between two PeerSync servers on loopback (real gRPC, no Envoy)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.peers.journal import Journal, SharedPrefixIndex
from extproc.peers.latency import Kind, Observation, ObservationDedup, ObservationLog, SharedLatencyModel
from extproc.peers.load import Load, PeerLoad
from extproc.peers.peerpb import peer_pb2 as pb
from extproc.peers.peerpb import peer_pb2_grpc as pb_grpc
from extproc.peers.sync import PROTOCOL_VERSION, PeerOptions, PeerSync, parse_peers
from pickers.framework.endpoint import EndpointSpec

E1, E2 = "10.0.0.1:8000", "10.0.0.2:8000"


def _datastore() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("e1", "10.0.0.1", 8000), EndpointSpec("e2", "10.0.0.2", 8000)])
    return ds


# -- the journal ------------------------------------------------------------------------------------


def test_journal_reads_from_a_cursor_in_order() -> None:
    j = Journal(100)
    j.append(E1, [1, 2], 0)
    j.append(E2, [3], 5)
    read = j.read(0, 100)
    assert [(e.address, list(e.hashes), e.capacity) for e in read.entries] == [(E1, [1, 2], 0), (E2, [3], 5)]
    assert read.cursor == 2 and read.dropped == 0
    assert j.read(read.cursor, 100).entries == []


def test_journal_is_bounded_by_blocks_and_tells_a_late_reader_what_it_missed() -> None:
    j = Journal(4)
    for h in range(5):
        j.append(E1, [h, h + 100], 0)
    assert j.blocks <= 4 and len(j) == 2
    read = j.read(0, 100)
    assert read.dropped == 3 and [e.hashes[0] for e in read.entries] == [3, 4]


def test_journal_keeps_a_record_larger_than_its_bound() -> None:
    j = Journal(2)
    j.append(E1, [1, 2, 3], 0)
    assert len(j) == 1 and j.read(0, 1).entries[0].hashes == [1, 2, 3]


def test_journal_read_stops_at_the_block_budget_but_returns_at_least_one_entry() -> None:
    j = Journal(100)
    for h in range(3):
        j.append(E1, [h] * 10, 0)
    first = j.read(0, 15)
    assert len(first.entries) == 1
    assert len(j.read(first.cursor, 25).entries) == 2


def test_journal_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1 block"):
        Journal(0)


def test_shared_index_journals_local_picks_but_not_peer_ones() -> None:
    index = SharedPrefixIndex()
    index.record(E1, [1, 2, 3], 100)
    index.apply_peer(E2, [1, 2], 0)
    assert index.match([1, 2, 3]) == {E1: 3, E2: 2}
    assert [e.address for e in index.journal.read(0, 100).entries] == [E1]
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


def _obs(i: int, address: str = E1) -> Observation:
    return Observation(Kind.TTFT, address, 1000 + i, 2, 0.1)


def test_observation_log_reads_from_a_cursor_and_tells_a_late_reader_what_it_missed() -> None:
    log = ObservationLog(3)
    for i in range(5):
        log.append(_obs(i))
    assert (log.first_seq, log.next_seq, len(log)) == (2, 5, 3)
    r = log.read(0, 2)
    assert (r.first_seq, r.cursor, r.dropped, [o.prefill_tokens for o in r.items]) == (2, 4, 2, [1002, 1003])
    r = log.read(r.cursor, 10)
    assert (r.first_seq, r.cursor, r.dropped, [o.prefill_tokens for o in r.items]) == (4, 5, 0, [1004])
    assert log.read(5, 10).items == []
    with pytest.raises(ValueError, match="at least 1"):
        ObservationLog(0)


def test_dedup_counts_each_observation_once_across_replays_and_forgets_the_oldest_peers() -> None:
    d = ObservationDedup(peers=2)
    assert d.new("a", 0, 5) == 0  # 0..4 new
    assert d.new("a", 0, 7) == 5  # a replay from 0: 5 already counted, 5..6 new
    assert d.new("a", 10, 2) == 0  # a gap (the sender's ring overwrote 7..9): nothing to skip
    assert d.new("a", 3, 4) == 4  # entirely old
    d.new("b", 0, 1)
    d.new("c", 0, 1)  # a third peer: the least recently heard ("a") is forgotten
    assert set(d.heard()) == {"b", "c"}
    assert d.new("a", 0, 3) == 0


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
    b.sync._apply("x", u, True)
    b.sync._apply("x", u, True)  # a reconnect replays it
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
