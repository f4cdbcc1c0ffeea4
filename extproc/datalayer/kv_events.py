"""KV-cache events from model servers (vLLM's `--kv-events-config`; docs/precise-routing.md): decode vLLM's ZMQ messages and keep the
precise prefix index (`pickers.indexes.kv_blocks.KVBlockIndex`) in step with what each engine holds.

Wire format: a ZMQ PUB socket per engine, 3 frames `[topic, 8-byte big-endian sequence, msgpack]`,
payload `[timestamp, [events...], data_parallel_rank?]`. Events are maps with a `type` key (vLLM
0.32) or tagged arrays `["BlockStored", ...]` (older vLLM); both decode to the structs below, once,
here. The subscriber connects a SUB socket to every endpoint's publisher (its port comes from the
endpoint label `llm-epp/kv-events-port`, else the configured default, 5557, plus the endpoint's
data-parallel rank, as llm-d's precise producer dials and vLLM binds one socket per rank), follows
membership and spec changes, detects lost messages by the sequence number and reconnects after
errors. With `bind` (llm-d's `kvEventsConfig.zmqEndpoint`) it also binds one SUB socket that engines
connect to: each message's topic `kv@<ip:port>@<model>` names the endpoint it belongs to (one not in
the pool is dropped). `topic_filter` is the subscription prefix (llm-d's `topicFilter`, "kv@").

Attribution (llm-d#2233): what arrives on an endpoint's own SUB socket is that endpoint's, whatever
the payload's `data_parallel_rank` says. That field is the engine's global DP rank (vLLM's
data_parallel_index), which differs from the endpoint's pod-local rank on every pod of a group after
the first, so a difference is normal and never moves events elsewhere. On the bound socket the ranks
of a pod may share one topic; their sequence numbers are then told apart by that field, so one
rank's stream does not look like lost messages of another's.

llm-d's data-parallel settings (newer than its v0.10; `RankAttribution`, `dp_size_total`):
- rank-granular identity (`kvEventsConfig.servingPortBase` > 0, with `dataParallelSizeLocal` ranks a
  pod): a batch stamped with DP rank R is the endpoint `<host>:(servingPortBase + R % dataParallelSizeLocal)`
  of the host it came from (the dialed pod's, or the topic's on the bound socket), and R is kept as that
  endpoint's global DP rank (p2p-source-producer's p2pPortBase reads it). Batches without a rank keep
  the endpoint they came for.
- `podDiscoveryConfig.dataParallelSizeTotal` > 1: the engines' publishers bind socketPort + their
  GLOBAL rank, which one endpoint does not tell, so every pod of the pool is dialed at socketPort + i
  for each i < dataParallelSizeTotal (a port nobody binds stays an idle connection), one stream per
  (pod, port). Those streams' batches go by rank as above, else to the endpoint their topic names.
An attributed endpoint that is not in the pool gets nothing (counted in `unattributed`, logged once).
SGLang's batches (`engine="sglang"`) are decoded alike (the same positional encoding, trailing
optional fields left out) and their DP rank is not read, as llm-d's SGLang adapter does not.

An endpoint's entries are dropped whenever its state may have changed unseen, so a restarted server
gives no false hits before its first event: a sequence gap, a publisher back at sequence 0, the
SUB connection dropping (a ZMQ socket monitor sees the TCP disconnect at once, ZMQ reconnects by
itself), an error on the stream, and the endpoint's metrics scrape starting to fail (a server down
or restarting; reported by the datastore), and the endpoint's publisher address changing (a new
rank or label). `KVEventSubscriber.resets` counts them by reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import msgspec

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.supervisor import Backoff
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex

log = logging.getLogger(__name__)

KV_EVENTS_PORT_LABEL = "llm-epp/kv-events-port"
DEFAULT_KV_EVENTS_PORT = 5557

BlockHash = int | bytes  # uint64 in vLLM 0.32; sha256 digests (bytes) in some versions


# -- the events as vLLM sends them: maps with `type` ----------------------------------------
class _MapEvent(msgspec.Struct, tag_field="type"):
    pass


class BlockStored(_MapEvent, tag="BlockStored"):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class BlockRemoved(_MapEvent, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None = None


class AllBlocksCleared(_MapEvent, tag="AllBlocksCleared"):
    pass


# -- the same as tagged arrays (older vLLM): extra trailing fields are ignored ---------------
class _ArrayBlockStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class _ArrayBlockRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None = None


class _ArrayAllBlocksCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_map_event = msgspec.msgpack.Decoder(BlockStored | BlockRemoved | AllBlocksCleared)
_array_event = msgspec.msgpack.Decoder(_ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared)


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: int | None = None


_batch = msgspec.msgpack.Decoder(_Batch)


class KVEventDecodeError(ValueError):
    """A payload that is not an event batch."""


@dataclass(slots=True, frozen=True)
class EventBatch:
    timestamp: float
    events: list[KVEvent]
    dp_rank: int | None = None
    skipped: int = 0  # events of a type we do not know (or malformed), left out


def _is_array(raw: bytes) -> bool:
    first = raw[0] if raw else 0
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def decode_event(raw: bytes) -> KVEvent:
    """One event in either encoding. Raises msgspec.DecodeError/ValidationError for others."""
    if _is_array(raw):
        e = _array_event.decode(raw)
        if isinstance(e, _ArrayBlockStored):
            return BlockStored(e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_id, e.medium, e.lora_name)
        if isinstance(e, _ArrayBlockRemoved):
            return BlockRemoved(e.block_hashes, e.medium)
        return AllBlocksCleared()
    return _map_event.decode(raw)


def decode_batch(payload: bytes) -> EventBatch:
    """The third frame of a message. Unknown event types are skipped, not fatal."""
    try:
        decoded = _batch.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise KVEventDecodeError(f"not a KV event batch: {e}") from None
    events: list[KVEvent] = []
    skipped = 0
    for raw in decoded.events:
        try:
            events.append(decode_event(bytes(raw)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            skipped += 1
    return EventBatch(decoded.ts, events, decoded.dp_rank, skipped)


def apply_events(index: KVBlockIndex, address: str, events: Sequence[KVEvent]) -> None:
    for e in events:
        if isinstance(e, BlockStored):
            index.block_stored(address, e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_name, e.medium)
        elif isinstance(e, BlockRemoved):
            index.block_removed(address, e.block_hashes, e.medium)
        else:
            index.clear_endpoint(address)


class SequenceTracker:
    """Per-stream sequence bookkeeping. `see(seq)` says what the message means for our state:
    "ok" (next in order, or the first one), "gap" (messages were lost), "restart" (the publisher
    started over from 0: a restarted engine, whose cache is empty)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: int | None = None

    def see(self, seq: int) -> str:
        last, self.last = self.last, seq
        if last is None or seq == last + 1:
            return "ok"
        if seq <= last:
            return "restart" if seq == 0 else "gap"  # a lower non-zero seq: a new publisher mid-stream
        return "gap"


@dataclass(slots=True, frozen=True)
class RankAttribution:
    """llm-d's rank-granular identity (`kvEventsConfig.servingPortBase`, `dataParallelSizeLocal`); off
    when `serving_port_base` is 0."""

    serving_port_base: int = 0
    dp_size_local: int = 1

    @property
    def on(self) -> bool:
        return self.serving_port_base > 0

    def endpoint(self, host: str, rank: int) -> str:
        return f"{host}:{self.serving_port_base + rank % self.dp_size_local}"


RANGE_KEY = "#dp-"  # a pod's stream at socketPort + i, in dataParallelSizeTotal mode: "<host>#dp-<i>"


def _host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def topic_endpoint(topic: bytes) -> str | None:
    """The endpoint a vLLM topic `kv@<ip:port>@<model>` names (as llm-d reads it), else None."""
    parts = topic.decode("utf-8", "replace").split("@")
    return parts[1] if len(parts) == 3 and parts[1] else None


def kv_events_address(spec: EndpointSpec, default_port: int | None) -> str | None:
    """Where an endpoint publishes: its `llm-epp/kv-events-port` label (that port exactly), else the
    default port plus the endpoint's rank (socketPort + RankIndex, as llm-d dials); None: nowhere."""
    raw = spec.labels.get(KV_EVENTS_PORT_LABEL)
    if raw:
        port = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 5 else 0
        if not 1 <= port <= 65535:
            log.warning("endpoint %s: label %s=%r is not a port 1-65535; no KV events from it", spec.name, KV_EVENTS_PORT_LABEL, raw)
            return None
    elif default_port:
        port = default_port + spec.rank
        if port > 65535:
            log.warning("endpoint %s: KV-event port %d (socketPort %d + rank %d) is not a port; no KV events from it",
                        spec.name, port, default_port, spec.rank)  # fmt: skip
            return None
    else:
        return None
    return f"tcp://{spec.host}:{port}"


class KVEventSubscriber:
    """One SUB socket per endpoint while `run()` runs; the index follows the pool's membership."""

    def __init__(
        self,
        datastore: Datastore,
        index: KVBlockIndex,
        *,
        default_port: int | None = DEFAULT_KV_EVENTS_PORT,
        address_of: Callable[[EndpointSpec, int | None], str | None] = kv_events_address,
        idle_reconnect: float = 0.0,  # >0: reconnect a stream silent this long (0: trust ZMQ's own)
        per_endpoint: bool = True,  # connect to each endpoint's publisher (llm-d's discoverPods)
        topic_filter: str = "",
        bind: str | None = None,  # also bind here for publishers that connect (llm-d's zmqEndpoint)
        attribution: RankAttribution = RankAttribution(),  # llm-d's servingPortBase / dataParallelSizeLocal
        dp_size_total: int = 1,  # llm-d's podDiscoveryConfig.dataParallelSizeTotal: >1 dials each pod's range
        engine: str = "vllm",  # llm-d's engineType: "sglang" batches' DP rank is not read
    ) -> None:
        self.datastore = datastore
        self.index = index
        self.default_port = default_port
        self.attribution = attribution
        self.dp_size_total = dp_size_total
        self.engine = engine
        self.unattributed = 0  # batches whose endpoint (by rank or topic) is not in the pool: dropped
        self._unattributed_warned: set[str] = set()
        self._fed: dict[str, set[str]] = {}  # stream key -> the endpoints its events went to
        self.per_endpoint = per_endpoint
        self.topic_filter = topic_filter.encode()
        self.bind = bind
        # bound socket: one stream per endpoint in the topic and payload DP rank (ranks may share a topic)
        self._bound_seq: dict[str, dict[int | None, SequenceTracker]] = {}
        self.unknown_sources = 0  # bound-socket messages whose topic names no endpoint of the pool
        self._address_of = address_of
        self.idle_reconnect = idle_reconnect
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._dialed: dict[str, str] = {}  # endpoint address -> the publisher its task follows
        self._shared_warned: set[str] = set()  # publishers already reported as named by several endpoints
        self._ctx: object | None = None
        self.messages = 0
        self.gaps = 0
        # times an endpoint's entries were dropped, by reason: gap, restart, disconnected,
        # stream_error, scrape_failed, publisher_changed (only counted when the index held that endpoint)
        self.resets: Counter[str] = Counter()
        datastore.on_membership_change(self._on_membership)
        datastore.on_spec_change(lambda changed: self._sync())  # a new rank or label may move the publisher
        datastore.on_scrape_failure(self._on_scrape_failure)

    @property
    def subscribed(self) -> frozenset[str]:
        return frozenset(self._tasks)

    def _on_membership(self, added: tuple[Endpoint, ...], removed: tuple[Endpoint, ...]) -> None:
        for ep in removed:
            self.index.remove_endpoint(ep.address)
            self._bound_seq.pop(ep.address, None)
        self._sync()

    def reset_endpoint(self, address: str, reason: str) -> None:
        """The endpoint's cache may have changed without events we saw: drop what we know of it
        (no false hits); the events that follow rebuild it."""
        if self.index.stats(address) is None:
            return
        held = self.index.blocks_of(address)
        self.index.clear_endpoint(address)
        self.resets[reason] += 1
        if held:
            log.info("kv events from %s: %s; its %d index entries are dropped until its events rebuild them", address, reason, held)

    def _reset_stream(self, key: str, reason: str) -> None:
        """A stream's state may have changed unseen: drop what it told about each endpoint it fed."""
        for address in {key} | self._fed.get(key, set()):
            if self.datastore.get(address) is not None:
                self.reset_endpoint(address, reason)

    def _on_scrape_failure(self, ep: Endpoint, error: str) -> None:
        self.reset_endpoint(ep.address, "scrape_failed")

    async def run(self) -> None:
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        self._ctx = ctx
        bound: asyncio.Task[None] | None = None
        try:
            self._sync()
            if self.bind:
                bound = asyncio.get_running_loop().create_task(self._follow_bound(self.bind), name=f"kv-events bind {self.bind}")
            await asyncio.Event().wait()
        finally:
            if bound is not None:
                bound.cancel()
                await asyncio.gather(bound, return_exceptions=True)
            self._ctx = None
            tasks = list(self._tasks.values())
            self._tasks.clear()
            self._dialed.clear()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            ctx.destroy(linger=0)

    def _wanted_ranges(self) -> dict[str, str]:
        """dataParallelSizeTotal mode: each pod host of the pool at socketPort + i, i < the total."""
        wanted: dict[str, str] = {}
        if not self.default_port:
            return wanted
        for host in sorted({ep.spec.host for ep in self.datastore.candidates()}):
            for i in range(self.dp_size_total):
                port = self.default_port + i
                if port > 65535:
                    log.warning("kv events: socketPort %d + %d is past the last port; %s is dialed at %d ports only",
                                self.default_port, i, host, i)  # fmt: skip
                    break
                wanted[f"{host}{RANGE_KEY}{i}"] = f"tcp://{host}:{port}"
        return wanted

    def _sync(self) -> None:
        if self._ctx is None or not self.per_endpoint:
            return
        wanted: dict[str, str] = {}  # stream key (an endpoint address, or a pod's range slot) -> its publisher
        owner: dict[str, str] = {}  # publisher -> the first endpoint that names it
        for ep in [] if self.dp_size_total > 1 else self.datastore.candidates():
            zmq_address = self._address_of(ep.spec, self.default_port)
            if zmq_address is None:
                continue
            first = owner.setdefault(zmq_address, ep.address)
            if first != ep.address:
                # One publisher is one engine: feeding its blocks to several endpoints would give false
                # hits. A pod label is shared by all its ranks, hence the hint.
                if zmq_address not in self._shared_warned:
                    self._shared_warned.add(zmq_address)
                    log.warning(
                        "kv events: %s and %s both name the publisher %s; only %s follows it. On a pod with "
                        "several ranks leave the %s label unset: each rank dials socketPort + its rank",
                        first, ep.address, zmq_address, first, KV_EVENTS_PORT_LABEL,
                    )  # fmt: skip
                continue
            wanted[ep.address] = zmq_address
        if self.dp_size_total > 1:
            wanted = self._wanted_ranges()
        for address in list(self._tasks):
            if self._dialed.get(address) != wanted.get(address):
                self._tasks.pop(address).cancel()
                self._dialed.pop(address, None)
                # still in the pool, another publisher or none: what we knew no longer follows it
                self._reset_stream(address, "publisher_changed")
                self._fed.pop(address, None)
        loop = asyncio.get_running_loop()
        for address, zmq_address in wanted.items():
            if address in self._tasks:
                continue
            task = loop.create_task(self._follow(address, zmq_address), name=f"kv-events {address}")
            self._tasks[address] = task
            self._dialed[address] = zmq_address
            task.add_done_callback(lambda t, a=address: self._task_done(a, t))

    def _task_done(self, address: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(address) is task:
            del self._tasks[address]
            self._dialed.pop(address, None)

    async def _follow(self, address: str, zmq_address: str) -> None:
        """Follow one stream (an endpoint's, or a pod's range slot) until it has nothing to follow;
        reconnect with backoff after errors."""
        backoff = Backoff(0.1, 5.0)
        seq = SequenceTracker()  # kept across reconnects: what was lost meanwhile shows as a gap
        while self._wants(address):
            try:
                await self._stream(address, zmq_address, backoff, seq)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not isinstance(e, TimeoutError):  # an idle stream (idle_reconnect) says nothing about the cache
                    self._reset_stream(address, "stream_error")
                delay = backoff.next_delay()
                log.warning("kv events from %s (%s): %s; reconnecting in %.1fs", address, zmq_address, e, delay)
                await asyncio.sleep(delay)

    def _wants(self, key: str) -> bool:
        """Whether a stream still has something to follow: its endpoint, or (a range slot) its pod."""
        if RANGE_KEY in key:
            host = key.split(RANGE_KEY, 1)[0]
            return any(ep.spec.host == host for ep in self.datastore.candidates())
        return self.datastore.get(key) is not None

    async def _stream(self, address: str, zmq_address: str, backoff: Backoff, seq: SequenceTracker) -> None:
        import zmq

        ctx = self._ctx
        assert ctx is not None
        sock = ctx.socket(zmq.SUB)  # type: ignore[attr-defined]
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter)  # one publisher per socket: every topic is this endpoint's
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        watch = asyncio.create_task(self._watch_disconnects(address, monitor), name=f"kv-events monitor {address}")
        sock.connect(zmq_address)
        log.info("kv events: subscribed to %s for %s", zmq_address, address)
        try:
            while True:
                if self.idle_reconnect > 0:
                    frames = await asyncio.wait_for(sock.recv_multipart(), self.idle_reconnect)
                else:
                    frames = await sock.recv_multipart()
                backoff.reset()
                self.handle_message(address, frames, seq)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
            sock.close(linger=0)

    async def _follow_bound(self, bind: str) -> None:
        """The bound socket, until stopped; rebound with backoff after errors."""
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                await self._stream_bound(bind, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad address or a socket error: logged, retried
                delay = backoff.next_delay()
                log.warning("kv events on %s: %s; binding again in %.1fs", bind, e, delay)
                await asyncio.sleep(delay)

    async def _stream_bound(self, bind: str, backoff: Backoff) -> None:
        import zmq

        ctx = self._ctx
        assert ctx is not None
        sock = ctx.socket(zmq.SUB)  # type: ignore[attr-defined]
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter)
        try:
            sock.bind(bind)
            log.info("kv events: bound %s for the engines that publish to it", bind)
            while True:
                frames = await sock.recv_multipart()
                backoff.reset()
                self.handle_bound_message(frames)
        finally:
            sock.close(linger=0)

    def handle_bound_message(self, frames: Sequence[bytes]) -> None:
        """One message on the bound socket: its topic `kv@<ip:port>@<model>` names the endpoint (or,
        by rank-granular identity, the host whose rank endpoint it is)."""
        if not frames:
            return
        address = topic_endpoint(frames[0])
        by_rank = address is not None and self.attribution.on and len(frames) == 3
        if address is None or (self.datastore.get(address) is None and not by_rank):
            self._unknown_topic(frames[0])
            return
        if not _well_formed(address, frames):
            return
        batch = self._decode(address, frames[2])
        if batch is None:
            # Its DP rank, hence its stream, is unknown: not counted in any sequence, so that
            # stream's next message shows the gap.
            self.messages += 1
            return
        target = self._by_rank(_host_of(address), batch) or address
        if self.datastore.get(target) is None:
            if target == address:  # a batch without a rank, its topic naming no endpoint of the pool
                self._unknown_topic(frames[0])
            else:
                self._unattributed(target, f"topic {frames[0][:200]!r}")
            return
        streams = self._bound_seq.get(address)
        if streams is None:
            streams = self._bound_seq[address] = {}
        seq = streams.get(batch.dp_rank)
        if seq is None:
            seq = streams[batch.dp_rank] = SequenceTracker()
        self._take(target, frames[1], batch, seq)

    def _unknown_topic(self, topic: bytes) -> None:
        self.unknown_sources += 1
        if self.unknown_sources == 1:
            log.warning("kv events: a message with topic %r names no endpoint of the pool (kv@<ip:port>@<model> "
                        "expected); such messages are dropped", topic[:200])  # fmt: skip

    def _by_rank(self, host: str, batch: EventBatch | None) -> str | None:
        """Rank-granular identity: the endpoint of `host` the batch's DP rank names (and that rank kept
        as its global rank), else None (no identity by rank: off, or a batch without a rank)."""
        if not self.attribution.on or batch is None or batch.dp_rank is None:
            return None
        target = self.attribution.endpoint(host, batch.dp_rank)
        if self.datastore.get(target) is not None:
            self.index.set_global_dp_rank(target, batch.dp_rank)
        return target

    def _unattributed(self, target: str, source: str) -> None:
        self.unattributed += 1
        if target not in self._unattributed_warned:
            self._unattributed_warned.add(target)
            log.warning("kv events from %s are for %s, which is not an endpoint of the pool (servingPortBase %d, "
                        "dataParallelSizeLocal %d); they are dropped", source, target,
                        self.attribution.serving_port_base, self.attribution.dp_size_local)  # fmt: skip

    async def _watch_disconnects(self, address: str, monitor: object) -> None:
        """The SUB socket's TCP connection dropped (the server died or restarted; ZMQ reconnects by
        itself, so the stream goes on): whatever happened meanwhile is unseen."""
        import zmq

        while True:
            frames = await monitor.recv_multipart()  # type: ignore[attr-defined]
            if len(frames) >= 1 and len(frames[0]) >= 2 and int.from_bytes(frames[0][:2], "little") == zmq.EVENT_DISCONNECTED:
                self._reset_stream(address, "disconnected")

    def handle_message(self, key: str, frames: Sequence[bytes], seq: SequenceTracker) -> None:
        """One ZMQ message of a stream (the socket-free part, tested on its own). An endpoint's own
        stream (`key` its address) is that endpoint's, whatever DP rank its payload names (see the module
        doc), unless rank-granular identity names another endpoint of its host; a pod's range stream
        (`<host>#dp-<i>`) goes by rank, else by its topic."""
        if not _well_formed(key, frames):
            return
        batch = self._decode(key, frames[2])
        if RANGE_KEY in key:
            target = self._by_rank(key.split(RANGE_KEY, 1)[0], batch) or topic_endpoint(frames[0])
            if target is None:
                self._unknown_topic(frames[0])
                return
        else:
            ep = self.datastore.get(key)
            target = (self._by_rank(ep.spec.host, batch) if ep is not None else None) or key
        if target != key and self.datastore.get(target) is None:
            self._unattributed(target, key)
            return
        self._fed.setdefault(key, set()).add(target)
        self._take(target, frames[1], batch, seq)

    def _decode(self, address: str, payload: bytes) -> EventBatch | None:
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as e:
            log.warning("kv events from %s: %s", address, e)
            return None
        if self.engine == "sglang" and batch.dp_rank is not None:
            batch = replace(batch, dp_rank=None)  # llm-d's SGLang adapter does not read it
        return batch

    def _take(self, address: str, seq_frame: bytes, batch: EventBatch | None, seq: SequenceTracker) -> None:
        """A message's sequence number, then its events (None: it did not decode) into the index."""
        self.messages += 1
        verdict = seq.see(int.from_bytes(seq_frame, "big"))
        if verdict == "gap":
            self.gaps += 1
            self.resets["gap"] += 1
            log.warning("kv events from %s: messages lost; its index entries are reset and rebuilt from new events", address)
            self.index.mark_gap(address)
        elif verdict == "restart":
            log.info("kv events from %s: the publisher restarted; its index entries are reset", address)
            self.resets["restart"] += 1
            self.index.clear_endpoint(address)
        if batch is not None:
            apply_events(self.index, address, batch.events)


def _well_formed(address: str, frames: Sequence[bytes]) -> bool:
    if len(frames) != 3 or len(frames[1]) != 8:
        log.debug("kv events from %s: ignoring a message of %d frames", address, len(frames))
        return False
    return True
