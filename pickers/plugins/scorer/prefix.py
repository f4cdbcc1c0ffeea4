"""prefix-cache-scorer: the share of the prompt's leading blocks an endpoint probably holds.

It reads the approximate index before the pick and records the prompt's blocks for the chosen
endpoint after it (PreRequest), sizing that endpoint's LRU from its reported KV cache (autoTune)
or `lruCapacityPerServer`. The match is kept in the cycle state so no-hit-lru-scorer reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import BLOCK_CHARS, DEFAULT_CAPACITY, MAX_BLOCKS, ApproxPrefixIndex, block_hashes
from pickers.plugins.base import Plugin, PluginContext


@dataclass(slots=True, frozen=True)
class PrefixMatch:
    hashes: list[int]
    matched: dict[str, int]  # address -> leading blocks it holds

    @property
    def cold(self) -> bool:
        """No endpoint holds even the first block (or the prompt is shorter than one block)."""
        return not self.matched


def prefix_match(
    request: InferenceRequest,
    cycle: CycleState,
    index: ApproxPrefixIndex,
    block_chars: int = BLOCK_CHARS,
    max_blocks: int = MAX_BLOCKS,
) -> PrefixMatch:
    """The request's blocks and who holds them, computed once per cycle for given block settings."""
    key = f"prefix-match/{block_chars}/{max_blocks}"
    found = cycle.data.get(key)
    if isinstance(found, PrefixMatch):
        return found
    hashes = block_hashes(request.model, request.prompt_text, _cache_salt(request), max_blocks, block_chars)
    result = PrefixMatch(hashes, index.match(hashes))
    cycle.data[key] = result
    return result


class PrefixCacheScorer(Plugin):
    type = "prefix-cache-scorer"
    category = "affinity"

    def __init__(
        self,
        index: ApproxPrefixIndex,
        name: str = "prefix-cache-scorer",
        *,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS,
        lru_capacity: int = DEFAULT_CAPACITY,
        auto_tune: bool = True,
    ) -> None:
        self.name = name
        self.index = index
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.lru_capacity = lru_capacity
        self.auto_tune = auto_tune

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrefixCacheScorer:
        return cls(
            ctx.prefix_index,
            name,
            block_chars=p.integer("blockSize", BLOCK_CHARS, minimum=1),  # characters, as in GIE
            max_blocks=p.integer("maxPrefixBlocksToMatch", MAX_BLOCKS, minimum=1),
            lru_capacity=p.integer("lruCapacityPerServer", DEFAULT_CAPACITY, minimum=1),
            auto_tune=p.flag("autoTune", True),
        )

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        m = prefix_match(request, cycle, self.index, self.block_chars, self.max_blocks)
        if not m.hashes:
            return [0.0] * len(endpoints)
        total = len(m.hashes)
        return [m.matched.get(ep.address, 0) / total for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if not result.endpoints:
            return
        m = prefix_match(request, cycle, self.index, self.block_chars, self.max_blocks)
        if m.hashes:
            ep = result.endpoints[0]
            self.index.record(ep.address, m.hashes, self._capacity(ep))
            if result.profile_results is not None:
                # P/D: the prefill endpoint computed the prompt's KV and keeps it in its cache too
                for chosen in result.profile_results.values():
                    if chosen and chosen[0] is not ep:
                        self.index.record(chosen[0].address, m.hashes, self._capacity(chosen[0]))

    def _capacity(self, ep: Endpoint) -> int:
        m = ep.metrics
        if self.auto_tune and m.num_gpu_blocks:
            # the server's cache in tokens, over our block size in (estimated) tokens
            block_tokens = max(1, self.block_chars // CHARS_PER_TOKEN)
            return max(1, m.num_gpu_blocks * (m.block_size or block_tokens) // block_tokens)
        return self.lru_capacity


def _cache_salt(request: InferenceRequest) -> str:
    salt = request.body.get("cache_salt") if request.body else None
    return salt if isinstance(salt, str) else ""


class ApproxPrefixCacheProducer(Plugin):
    """llm-d's `approx-prefix-cache-producer` feeds its prefix scorer and P/D decider. Here the
    prefix-cache-scorer keeps the shared index itself, so this loads (for llm-d configs) and does nothing."""

    type = "approx-prefix-cache-producer"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ApproxPrefixCacheProducer:
        p.ignore("blockSize", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch",
                 "lruCapacityPerServer", "autoTune")
        return cls(name)
