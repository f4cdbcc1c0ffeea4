"""The exchange between replicas: a PeerSync gRPC server that applies what peers push, and one pusher
per peer that streams this replica's journal and load to it.

A pusher wakes when a pick is journalled and sends what gathered within `flush_interval` (so picks are
batched under load and reach peers within milliseconds when it is light), looks at this replica's
load and latency observations every LOAD_POLL seconds (a request that ended changes them without a
pick), sends a load snapshot when it changed and at least every HEARTBEAT seconds, and on
(re)connecting replays what the journal and the observation log still hold, so a peer that was cut
off or restarted catches up. Both are numbered rings (extproc.peers.ring): the receiver applies each
pick and observation once per incarnation of the sender (a random number per process, in the hello),
so a replay after a reconnect repeats nothing and a sender restarted under the same replica id is
counted afresh from its first pick. A peer that cannot be reached is retried with backoff; meanwhile
this replica serves on its own state. A target that turns out to be this replica (a Service lists
every replica) answers ALREADY_EXISTS and is not dialled again. On shutdown the pushers send what is
left and an empty load snapshot, so peers drop this replica's load at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.supervisor import Backoff
from extproc.peers.journal import DEFAULT_JOURNAL_BLOCKS, SharedPrefixIndex
from extproc.peers.latency import Kind, Observation, SharedLatencyModel
from extproc.peers.load import DEFAULT_TTL, Load, PeerLoad
from extproc.peers.ring import Applied
from extproc.peers.peerpb import peer_pb2 as pb
from extproc.peers.peerpb import peer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_PORT = 9004
# Seconds a pusher waits after a pick for more to send with it. Two replicas that pick within this
# (plus the network) of each other do not see each other's pick: both may choose the same endpoint.
DEFAULT_FLUSH_INTERVAL = 0.005
LOAD_POLL = 0.05  # seconds between looks at this replica's load when no pick comes
HEARTBEAT = 0.5  # seconds between load snapshots when nothing changed (peers expire us after DEFAULT_TTL)
MAX_UPDATE_BLOCKS = 16_384  # hashes per message (128 KiB): a replay after a partition goes in pieces
MAX_UPDATE_OBSERVATIONS = 2_048  # latency observations per message (~60 KiB)
STOP_FLUSH_TIMEOUT = 1.0  # seconds the last batch may take on shutdown
HEARD_PEERS = 256  # peer ids (without a live stream) whose counts a replica remembers; the oldest go first
# Keepalive pings find a peer that stopped answering (SIGSTOP, a partition without resets) within ~2 s.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_KINDS = {k.value: k for k in Kind}
_MAX_AGE_US = 2**32 - 1  # BlockRecord.age_us is 32 bits (~71 minutes; a replay of older picks says that)
_SERVER_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


@dataclass(slots=True, frozen=True)
class PeerOptions:
    """How a replica finds and talks to its peers (`epp serve --peers / --peer-service`)."""

    peers: tuple[str, ...] = ()  # static host:port list (this replica may be in it)
    service: str = ""  # a headless Service whose EndpointSlices list the replicas (Kubernetes)
    namespace: str = ""  # the Service's (default: $NAMESPACE, else the pod's own)
    kubeconfig: str | None = None  # to reach the API server for `service` (default: in-cluster)
    port: int = DEFAULT_PORT  # where this replica takes peers' streams; peers of a Service use it too
    bind_address: str = "0.0.0.0"
    replica_id: str = ""  # default: pod name (or host name), process id and a random suffix
    journal_blocks: int = DEFAULT_JOURNAL_BLOCKS
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    ttl: float = DEFAULT_TTL


def default_replica_id() -> str:
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def parse_peers(text: str) -> tuple[str, ...]:
    """`host:port,host:port` as given to --peers; raises ValueError naming the bad entry."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peer {item!r}: expected host:port (a port 1-65535)")
        out.append(item)
    return tuple(dict.fromkeys(out))


@dataclass(slots=True)
class SyncStats:
    """Counters of one replica's exchange (shown at /debug/runtime and by bench/replicas.py)."""

    updates_sent: int = 0
    bytes_sent: int = 0  # serialized, before gRPC's gzip
    records_sent: int = 0
    records_dropped: int = 0  # journal entries overwritten before a peer got them
    updates_received: int = 0
    bytes_received: int = 0
    records_applied: int = 0
    records_unknown: int = 0  # for endpoints this replica does not have (yet)
    records_repeated: int = 0  # replayed ones already applied (skipped)
    # Picks this replica made without knowing a peer's earlier pick of the same prefix (the prompt's
    # first block): the peer's pick arrived after a local pick made since it (by its age_us; the
    # network's own delay is not counted, so this errs low). `split`: the two went to different
    # endpoints, where one replica with both picks would likely have chosen the peer's endpoint.
    blind_picks_same: int = 0
    blind_picks_split: int = 0
    observations_sent: int = 0  # latency observations of this replica's responses sent (to all peers)
    observations_dropped: int = 0  # overwritten in the log before a peer got them
    observations_applied: int = 0  # peers' observations counted into this replica's fits
    observations_repeated: int = 0  # replayed ones already counted (skipped)
    observations_unknown: int = 0  # for endpoints this replica does not have (yet), or of a kind it does not know
    connects: int = 0
    refused: int = 0  # inbound streams refused (version, self)


@dataclass(slots=True)
class _Heard:
    """What this replica applied of one peer id's numbering, in one incarnation (process) of that peer."""

    incarnation: int  # 0: a sender that names none (every stream of it counts afresh)
    live: int = 0  # its streams open now (a reconnect may overlap the stream it replaces)
    blocks: Applied = field(default_factory=Applied)  # its journal
    observations: Applied = field(default_factory=Applied)  # its observation log


@dataclass(slots=True)
class _Target:
    address: str
    task: asyncio.Task[None] | None = None
    connected: bool = False
    is_self: bool = False
    error: str = ""
    since: float = field(default_factory=time.monotonic)


class PeerSync(pb_grpc.PeerSyncServicer):
    def __init__(
        self,
        opts: PeerOptions,
        index: SharedPrefixIndex,
        datastore: Datastore,
        digest: Callable[[], str] = lambda: "",
        latency: SharedLatencyModel | None = None,
    ) -> None:
        self.opts = opts
        self.replica_id = opts.replica_id or default_replica_id()
        self.index = index
        self.latency = latency  # None: the latency fits stay this replica's own
        self.datastore = datastore
        self.load = PeerLoad(datastore, opts.ttl)
        self.digest = digest
        self.stats = SyncStats()
        self._targets: dict[str, _Target] = {}
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._wake: set[asyncio.Event] = set()  # one per pusher, set when a pick is journalled
        index.journal.on_append = self._picked
        self.incarnation = secrets.randbits(64) | 1  # this process: peers count our numbering afresh when it changes
        self._heard: OrderedDict[str, _Heard] = OrderedDict()  # peer id -> what arrived from it, least recent first
        self._mismatch_warned: set[str] = set()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        datastore.on_membership_change(lambda added, removed: self.load.reconcile_all())
        self.set_targets(opts.peers)

    # -- the server: what peers push ----------------------------------------------------------------
    async def start(self) -> None:
        self._server = grpc.aio.server(options=_SERVER_OPTIONS)
        pb_grpc.add_PeerSyncServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{self.opts.bind_address}:{self.opts.port}")
        await self._server.start()
        log.info("peer sync on :%d as %s (%d static peers)", self.port, self.replica_id, len(self.opts.peers))

    async def Push(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.PushSummary:  # noqa: N802 (gRPC name)
        first = await context.read()
        if first is grpc.aio.EOF:
            return pb.PushSummary()
        if not first.HasField("hello"):
            self.stats.refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first update of a stream must carry hello")
        hello = first.hello
        if hello.version != PROTOCOL_VERSION:
            self.stats.refused += 1
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer protocol version {hello.version}; this replica speaks version {PROTOCOL_VERSION}",
            )
        if not hello.replica_id:
            self.stats.refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello must name the sending replica (replica_id)")
        if hello.replica_id == self.replica_id:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "this is the replica itself")
        peer = hello.replica_id
        blocks_ok = hello.config_digest == self.digest()
        if not blocks_ok and peer not in self._mismatch_warned:
            self._mismatch_warned.add(peer)
            log.warning(
                "peer %s hashes prompt blocks differently (%s; here %s): its load is shared, its prefix blocks "
                "are not (give every replica the same prefix settings)", peer, hello.config_digest, self.digest(),
            )  # fmt: skip
        heard = self._open(peer, hello.incarnation)
        applied = 0
        try:
            msg = first
            while msg is not grpc.aio.EOF:
                if self._heard.get(peer) is heard:  # else a new incarnation replaced this process: what is left of it is stale
                    self._apply(peer, heard, msg, blocks_ok)
                    applied += 1
                msg = await context.read()
        finally:
            heard.live -= 1
            if heard.live == 0 and self._heard.get(peer) is heard:  # its last stream: the peer is gone (for now)
                self._mismatch_warned.discard(peer)
                self.load.forget(peer)
        return pb.PushSummary(updates=applied)

    def _open(self, peer: str, incarnation: int) -> _Heard:
        """A new stream from `peer`: the same incarnation goes on counting, a new one (a restart) starts afresh."""
        heard = self._heard.get(peer)
        if heard is None or incarnation == 0 or heard.incarnation != incarnation:
            if heard is not None:
                if incarnation != 0:
                    log.info("peer %s restarted (a new incarnation): its picks and observations are counted afresh", peer)
                self.load.forget(peer)  # the old process's requests are gone with it
            heard = self._heard[peer] = _Heard(incarnation)
        heard.live += 1
        self._heard.move_to_end(peer)
        idle = [p for p, h in self._heard.items() if not h.live]
        for p in idle[: max(0, len(self._heard) - HEARD_PEERS)]:
            del self._heard[p]
        return heard

    def _apply(self, peer: str, heard: _Heard, u: pb.Update, blocks_ok: bool) -> None:
        st = self.stats
        st.updates_received += 1
        st.bytes_received += u.ByteSize()
        skip = heard.blocks.new(u.journal_next - len(u.blocks), len(u.blocks))  # also without blocks: its position
        st.records_repeated += skip
        if blocks_ok and len(u.blocks) > skip:
            known = self.datastore.get
            now = time.monotonic()
            for rec in u.blocks[skip:] if skip else u.blocks:
                if known(rec.endpoint) is None:
                    st.records_unknown += 1
                    continue
                if rec.age_us and rec.hashes:
                    self._count_blind(rec.endpoint, rec.hashes[0], now - rec.age_us / 1e6)
                self.index.apply_peer(rec.endpoint, list(rec.hashes), rec.capacity)
                st.records_applied += 1
        if u.observations:
            self._apply_observations(heard, u)
        if u.load_snapshot:
            self.load.update(peer, {e.endpoint: Load(e.requests, e.tokens, e.prefill_tokens, e.output_tokens) for e in u.load})
        else:
            self.load.heard(peer)

    def _count_blind(self, endpoint: str, first_block: int, picked_at: float) -> None:
        """A peer picked `endpoint` for a prompt starting with `first_block` at about `picked_at` (this
        replica's clock): did a local pick of that prefix come after it, before it was heard here?"""
        mine = self.index.latest_local(first_block)
        if mine is not None and mine[1] > picked_at:
            if mine[0] == endpoint:
                self.stats.blind_picks_same += 1
            else:
                self.stats.blind_picks_split += 1

    def _apply_observations(self, heard: _Heard, u: pb.Update) -> None:
        st = self.stats
        skip = heard.observations.new(u.observation_seq, len(u.observations))
        st.observations_repeated += skip
        model = self.latency
        if model is None:
            return
        known = self.datastore.get
        for o in u.observations[skip:] if skip else u.observations:
            ep = known(o.endpoint)
            if ep is None or o.kind not in _KINDS:
                st.observations_unknown += 1
                continue
            model.apply_peer(ep, Observation(_KINDS[o.kind], o.endpoint, o.prefill_tokens, o.batch, o.seconds))
            st.observations_applied += 1

    # -- the pushers: what this replica tells its peers -------------------------------------------------
    def set_targets(self, addresses: Iterable[str]) -> None:
        """The peers to push to (host:port); from the static list and/or discovery."""
        wanted = set(addresses) | set(self.opts.peers)
        for address in list(self._targets):
            if address not in wanted:
                t = self._targets.pop(address)
                if t.task is not None:
                    t.task.cancel()
        for address in wanted - set(self._targets):
            self._targets[address] = _Target(address)
        self._changed.set()

    async def run(self) -> None:
        """Keep one pusher per target until cancelled (the EPP's supervisor owns this task)."""
        try:
            while True:
                for t in self._targets.values():
                    if t.task is None and not t.is_self:
                        t.task = asyncio.get_running_loop().create_task(self._push(t), name=f"peer-push/{t.address}")
                self._changed.clear()
                for peer in self.load.expire():
                    log.warning("peer %s: nothing heard for %.1fs; its load no longer counts", peer, self.opts.ttl)
                try:
                    await asyncio.wait_for(self._changed.wait(), HEARTBEAT)
                except TimeoutError:
                    pass
        finally:
            tasks = [t.task for t in self._targets.values() if t.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _push(self, t: _Target) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                await self._stream_to(t)
                return  # ended by stop()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    t.is_self, t.connected = True, False
                    log.debug("peer %s is this replica; not dialled again", t.address)
                    return
                error = f"{e.code().name}: {e.details()}"
            except Exception as e:  # a bug must not end the exchange for good
                log.exception("peer %s: push failed", t.address)
                error = f"{type(e).__name__}: {e}"
            if t.connected or not t.error:
                log.warning("peer %s unreachable (%s); serving on this replica's own state, retrying", t.address, error)
            if t.connected:
                backoff.reset()  # it was serving: try again soon
            t.connected, t.error, t.since = False, error, time.monotonic()
            if self._stopping.is_set():
                return
            await asyncio.sleep(backoff.next_delay())

    def _picked(self) -> None:
        for ev in self._wake:
            ev.set()

    async def _stream_to(self, t: _Target) -> None:
        wake = asyncio.Event()
        self._wake.add(wake)
        try:
            await self._stream_with(t, wake)
        finally:
            self._wake.discard(wake)

    async def _stream_with(self, t: _Target, wake: asyncio.Event) -> None:
        journal = self.index.journal
        log_ = self.latency.log if self.latency is not None else None
        async with grpc.aio.insecure_channel(t.address, options=_CHANNEL_OPTIONS, compression=grpc.Compression.Gzip) as channel:
            call = pb_grpc.PeerSyncStub(channel).Push()
            hello = pb.Hello(version=PROTOCOL_VERSION, replica_id=self.replica_id, config_digest=self.digest(), incarnation=self.incarnation)
            await self._write(call, pb.Update(hello=hello))
            cursor = journal.first_seq  # replay what the journal holds: the peer catches up
            obs_cursor = log_.first_seq if log_ is not None else 0  # and the observations (it skips those it has)
            last_load: list[tuple[str, Load]] | None = None
            last_sent = 0.0
            first = True
            while True:
                if call.done():  # the peer ended the stream (refused it, or went away)
                    await call  # raises its status
                    return
                stopping = self._stopping.is_set()
                read = journal.read(cursor, MAX_UPDATE_BLOCKS)
                cursor = read.cursor
                u = pb.Update(dropped=read.dropped, journal_next=cursor)
                now = time.monotonic()
                for e in read.items:
                    age_us = min(_MAX_AGE_US, max(1, int((now - e.at) * 1e6)))
                    u.blocks.add(endpoint=e.address, hashes=e.hashes, capacity=e.capacity, age_us=age_us)
                observed = log_.read(obs_cursor, MAX_UPDATE_OBSERVATIONS) if log_ is not None else None
                if observed is not None and (observed.items or observed.dropped):
                    obs_cursor = observed.cursor
                    u.observation_seq = observed.first_seq
                    for o in observed.items:
                        u.observations.add(kind=o.kind, endpoint=o.address, prefill_tokens=o.prefill_tokens, batch=o.batch, seconds=o.seconds)
                own = [] if stopping else self.load.own()
                if own != last_load or now - last_sent >= HEARTBEAT:
                    u.load_snapshot = True
                    for address, load in own:
                        u.load.add(endpoint=address, requests=load.requests, tokens=load.tokens,
                                   prefill_tokens=load.prefill_tokens, output_tokens=load.output_tokens)
                    last_load = own
                if read.items or u.load_snapshot or read.dropped or u.observations:
                    await self._write(call, u)
                    last_sent = now
                    st = self.stats
                    st.records_sent += len(read.items)
                    st.records_dropped += read.dropped
                    if observed is not None:
                        st.observations_sent += len(observed.items)
                        st.observations_dropped += observed.dropped
                    if first:
                        first = False
                        st.connects += 1
                        if t.error:
                            log.info("peer %s reachable again", t.address)
                        t.connected, t.error, t.since = True, "", now
                caught_up = cursor >= journal.next_seq and (log_ is None or obs_cursor >= log_.next_seq)
                if stopping and caught_up:
                    await call.done_writing()
                    await call
                    return
                if caught_up:  # caught up: wait for the next pick (or a look at the load)
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), LOAD_POLL)
                    except TimeoutError:
                        pass
                    else:
                        if self.opts.flush_interval > 0 and not self._stopping.is_set():
                            await asyncio.sleep(self.opts.flush_interval)  # let the picks of a burst join

    async def _write(self, call: Any, u: pb.Update) -> None:
        try:
            await call.write(u)
        except grpc.aio.AioRpcError:
            raise
        except Exception:  # the RPC ended under the write: its status says why
            await call  # raises the AioRpcError
            raise
        self.stats.updates_sent += 1
        self.stats.bytes_sent += u.ByteSize()

    async def stop(self) -> None:
        """Send what is left (and that this replica has no load now) to connected peers, then stop serving."""
        self._stopping.set()
        self._picked()  # wake the pushers
        tasks = [t.task for t in self._targets.values() if t.task is not None and t.connected]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_FLUSH_TIMEOUT)
        if self._server is not None:
            await self._server.stop(0.5)

    # -- views ---------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        st = self.stats
        journal = self.index.journal
        return {
            "replica_id": self.replica_id,
            "port": self.port,
            "peers": {
                t.address: {"connected": t.connected, "self": t.is_self, "error": t.error, "for_s": round(now - t.since, 1)}
                for t in self._targets.values()
            },
            "incarnation": f"{self.incarnation:016x}",
            "inbound": sorted(p for p, h in self._heard.items() if h.live),
            "journal_next": journal.next_seq,  # this replica's picks so far
            "heard_upto": {p: h.blocks.next_seq for p, h in self._heard.items()},  # per peer id: its picks that have arrived here
            "journal_entries": len(journal),
            "journal_blocks": journal.weight,
            "observations_next": self.latency.log.next_seq if self.latency is not None else 0,  # this replica's own
            "observation_log": len(self.latency.log) if self.latency is not None else 0,  # held for the peers
            "observations_heard": {p: h.observations.next_seq for p, h in self._heard.items()},  # per peer id: its next observation's number
            "peer_load_entries": self.load.entries(),
            "peer_load": self.load.total()._asdict(),
            **{name: getattr(st, name) for name in SyncStats.__slots__},  # type: ignore[attr-defined]
        }
