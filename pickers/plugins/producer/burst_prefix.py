"""burst-prefix-cache-producer (llm-d): requests that arrive within `windowDurationMs` are placed
jointly, so a burst of requests sharing a prompt (the n samples of an RL rollout step) is prefilled
once on one replica instead of once per replica while every cache is still cold.

The EPP awaits `produce_async` for each request with a prompt, before flow control and the pick
(pickers.framework.types.AsyncDataProducer): the first request of a window opens a batch and an
event-loop timer; every request joins it and waits; when the timer fires the batch is sealed, placed
(pickers.plugins.producer.burst_assign) and every waiter goes on with its replica, put on the request.
`prefix_matches` then gives a full match on that replica and none elsewhere, which the
prefix-cache-scorer naming this producer in `prefixMatchInfoProducerName` scores (as llm-d's
PrefixCacheMatchInfo). Nothing persists past a window: warm caches across windows are the business
of an approximate or precise prefix producer, which can run alongside.

Bounded: a window holds at most `maxBatchSize` requests (later ones go on at once, with no affinity,
counted as `batch_full`); a request whose client leaves while it waits is taken out of the batch.
Prompts are cut into blocks of `blockSizeTokens` x 4 characters (llm-epp's token estimate, as the
approximate prefix index), the last one possibly shorter, so equal blocks mean equal prompts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.prefix import block_hashes
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.producer.burst_assign import UNLIMITED, BurstEntry, assign

log = logging.getLogger(__name__)

# llm-d's defaults and bounds
DEFAULT_WINDOW_MS = 100
MAX_WINDOW_MS = 10_000  # every request waits up to the window: a larger one is a mistake
DEFAULT_BLOCK_TOKENS = 64
DEFAULT_MAX_BLOCKS = 2048  # blocks hashed when maxPrefixTokensToMatch is 0
DEFAULT_MAX_BATCH = 1000
BALANCE_BY = ("requests", "tokens")

# request.attributes keys (with the producer's name): the replica a request was placed on, and its blocks
ASSIGNED_ATTRIBUTE = "BurstAssignedEndpoint"
BLOCKS_ATTRIBUTE = "BurstPrefixBlocks"


@dataclass(slots=True, eq=False)
class _Batch:
    """The requests of one window, released together when it is sealed."""

    sealed: asyncio.Event = field(default_factory=asyncio.Event)
    entries: list[BurstEntry] = field(default_factory=list)
    size: int = 0  # entries still waiting (a cancelled one leaves)
    closed: bool = False
    timer: asyncio.TimerHandle | None = None


class BurstPrefixCacheProducer(Plugin):
    type = "burst-prefix-cache-producer"

    def __init__(
        self,
        name: str = "burst-prefix-cache-producer",
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_per_replica: int = UNLIMITED,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_prefix_tokens: int = 0,
        min_colocate_blocks: int = 0,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        balance_by: str = "requests",
    ) -> None:
        self.name = name
        self.window = window_ms / 1000
        self.max_per_replica = max_per_replica
        self.block_tokens = block_tokens
        self.block_chars = block_tokens * CHARS_PER_TOKEN
        self.max_blocks = max_prefix_tokens // block_tokens if max_prefix_tokens > 0 else DEFAULT_MAX_BLOCKS
        self.min_colocate_blocks = min_colocate_blocks
        self.max_batch_size = max_batch_size
        self.by_tokens = balance_by == "tokens"
        self._assigned_key = (ASSIGNED_ATTRIBUTE, name)
        self._blocks_key = (BLOCKS_ATTRIBUTE, name)
        self._open: _Batch | None = None
        # requests by outcome (assigned, unassigned, batch_full, cancelled) and batches sealed
        self.counts: Counter[str] = Counter()

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> BurstPrefixCacheProducer:
        window = p.integer("windowDurationMs", DEFAULT_WINDOW_MS)
        if not 1 <= window <= MAX_WINDOW_MS:
            raise ParameterError(
                "windowDurationMs", f"must be between 1 and {MAX_WINDOW_MS} (every request waits up to this long), got {window}"
            )
        per_replica = p.integer("maxPerReplica", UNLIMITED)
        if per_replica != UNLIMITED and per_replica < 1:
            raise ParameterError("maxPerReplica", f"must be -1 (a whole group to one replica) or at least 1, got {per_replica}")
        block = p.integer("blockSizeTokens", DEFAULT_BLOCK_TOKENS, minimum=1)
        max_tokens = p.integer("maxPrefixTokensToMatch", 0, minimum=0)
        if 0 < max_tokens < block:
            raise ParameterError(
                "maxPrefixTokensToMatch",
                f"{max_tokens} is less than one block ({block} tokens), so no prompt would have a block; use 0 or at least {block}",
            )
        colocate = p.integer("minColocateBlocks", 0, minimum=0)
        batch = p.integer("maxBatchSize", DEFAULT_MAX_BATCH)
        if batch != UNLIMITED and batch < 1:
            raise ParameterError("maxBatchSize", f"must be -1 (unlimited) or at least 1, got {batch}")
        balance = p.string("balanceBy", "requests") or "requests"  # llm-d: empty means requests
        if balance not in BALANCE_BY:
            raise ParameterError("balanceBy", f"expected one of {', '.join(BALANCE_BY)}, got {balance!r}")
        p.effective["balanceBy"] = balance
        return cls(
            name,
            window_ms=window,
            max_per_replica=per_replica,
            block_tokens=block,
            max_prefix_tokens=max_tokens,
            min_colocate_blocks=colocate,
            max_batch_size=batch,
            balance_by=balance,
        )

    # -- before the pick: the window ------------------------------------------------------------
    def waits_for(self, request: InferenceRequest) -> bool:
        """A request with a prompt joins a window; one without could not share a prefix and goes on."""
        return bool(request.prompt_text)

    async def produce_async(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        """Join the open window (or open one), wait for it to be sealed, and note the replica this
        request was placed on. Cancelled while waiting, the request leaves the batch."""
        if not endpoints:
            return  # nowhere to go: the pick answers 503
        hashes = block_hashes(request.model, request.prompt_text, request.cache_salt, self.max_blocks, self.block_chars, partial=True)
        if not hashes:
            return
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            batch.timer = asyncio.get_running_loop().call_later(self.window, self._seal, batch)
        elif self.max_batch_size != UNLIMITED and batch.size >= self.max_batch_size:
            self._batch_full()
            return
        entry = BurstEntry(hashes, endpoints)
        batch.entries.append(entry)
        batch.size += 1
        try:
            await batch.sealed.wait()
        except asyncio.CancelledError:
            if not batch.closed:  # taken out: it neither counts nor is placed
                entry.hashes = ()
                batch.size -= 1
            self.counts["cancelled"] += 1
            raise
        request.attributes[self._blocks_key] = str(len(hashes))
        if entry.assigned is not None:
            request.attributes[self._assigned_key] = entry.assigned.address

    def _seal(self, batch: _Batch) -> None:
        """The window is over: place its requests and let them all go; later requests open a new one."""
        if batch.closed:
            return
        batch.closed = True
        if self._open is batch:
            self._open = None
        if batch.timer is not None:
            batch.timer.cancel()  # sealed early (close)
        try:
            entries = [e for e in batch.entries if e.hashes]
            assign(entries, self.max_per_replica, self.min_colocate_blocks, self.by_tokens)
            placed = sum(1 for e in entries if e.assigned is not None)
            self.counts["batches"] += 1
            self.counts["assigned"] += placed
            self.counts["unassigned"] += len(entries) - placed
        finally:
            batch.entries = []
            batch.sealed.set()  # whatever happened, nobody waits past the window

    def _batch_full(self) -> None:
        first = "batch_full" not in self.counts
        self.counts["batch_full"] += 1
        if first:
            log.warning("%s %s: a window reached maxBatchSize %d; later requests of a full window go on with no "
                        "affinity (counted in llm_epp_burst_prefix_requests_total{outcome=\"batch_full\"}, logged once)",
                        self.type, self.name, self.max_batch_size)  # fmt: skip

    def close(self) -> None:
        """The EPP is stopping: seal the open window now, so nobody waits for its timer."""
        if self._open is not None:
            self._seal(self._open)

    # -- in the cycle: the match the prefix scorer reads ------------------------------------------
    def prefix_matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """Every block on the replica this request was placed on, none elsewhere; nothing when it
        did not wait in a window (no prompt, a full window)."""
        blocks = request.attributes.get(self._blocks_key)
        if blocks is None:
            return {}
        total, bt = int(blocks), self.block_tokens
        assigned = request.attributes.get(self._assigned_key)
        return {ep.address: (total if ep.address == assigned else 0, total, bt) for ep in endpoints}
