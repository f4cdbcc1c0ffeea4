"""KV-event publisher: the simulator's prefix cache, mirrored over ZMQ the way vLLM publishes it.

A PUB socket; each message is `[topic, 8-byte big-endian sequence from 0, msgpack [ts, [events],
data_parallel_rank]]`, the rank being the engine's global DP rank in a DP group, else None.
Events raised during one event-loop turn go out as one batch, like vLLM's per-step batches.
`encoding="map"` sends vLLM 0.32's maps with a `type` key, `"array"` the older tagged arrays.
Sends never block: a subscriber that cannot keep up loses messages (and sees the gap).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from vllm_sim.cache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """vLLM's `--kv-events-config` fields the simulator honours."""

    endpoint: str  # "tcp://*:5557"; port 0 or "*" binds a random port
    topic: str = ""  # "" = kv@<host:port>@<model> once the server's port is known
    encoding: str = "map"  # "map" (vLLM 0.32) or "array" (older vLLM)

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig | None:
        """None when events are not enabled. Raises ValueError with the field at fault."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"kv-events-config: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("kv-events-config: expected a JSON object")
        if not raw.get("enable_kv_cache_events", False):
            return None
        if raw.get("publisher", "zmq") != "zmq":
            raise ValueError(f"kv-events-config: publisher: only 'zmq' is simulated, got {raw.get('publisher')!r}")
        encoding = raw.get("encoding", "map")
        if encoding not in ("map", "array"):
            raise ValueError(f"kv-events-config: encoding: expected 'map' or 'array', got {encoding!r}")
        return cls(str(raw.get("endpoint", "tcp://*:5557")), str(raw.get("topic", "")), encoding)


def encode_event(event: CacheEvent, encoding: str = "map") -> Any:
    if isinstance(event, BlockStored):
        fields: dict[str, Any] = {
            "block_hashes": list(event.block_hashes), "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids), "block_size": event.block_size,
            "lora_id": None, "medium": "GPU", "lora_name": None,
        }  # fmt: skip
        name = "BlockStored"
    elif isinstance(event, BlockRemoved):
        fields = {"block_hashes": list(event.block_hashes), "medium": "GPU"}
        name = "BlockRemoved"
    else:
        assert isinstance(event, AllBlocksCleared)
        fields, name = {}, "AllBlocksCleared"
    if encoding == "array":
        return [name, *fields.values()]
    return {"type": name, **fields}


class KVEventPublisher:
    def __init__(self, config: KVEventsConfig, data_parallel_rank: int | None = None) -> None:
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        self.topic = config.topic.encode()
        self.port = 0
        self.seq = 0
        self._ctx: Any = None
        self._sock: Any = None
        self._pending: list[Any] = []
        self._scheduled = False

    def bind(self) -> int:
        import zmq

        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        endpoint = self.config.endpoint
        prefix, _, port = endpoint.rpartition(":")
        if port in ("0", "*"):
            self.port = sock.bind_to_random_port(prefix)
        else:
            sock.bind(endpoint)
            self.port = int(port)
        self._sock = sock
        return self.port

    def set_topic(self, topic: str) -> None:
        self.topic = topic.encode()

    def on_event(self, event: CacheEvent) -> None:
        """A cache listener: queue the event; the batch is sent at the end of this loop turn."""
        self._pending.append(encode_event(event, self.config.encoding))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        import zmq

        self._scheduled = False
        if not self._pending or self._sock is None:
            self._pending.clear()
            return
        payload = msgspec.msgpack.encode([time.time(), self._pending, self.data_parallel_rank])
        self._pending = []
        try:
            self._sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no room: this message is lost, and subscribers see the gap in the sequence
        self.seq += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
