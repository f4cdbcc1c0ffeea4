"""prefix-cache-scorer: the share of the prompt's leading blocks an endpoint probably holds.

It reads the approximate index before the pick and records the prompt's blocks for the chosen
endpoint after it (PreRequest), sizing that endpoint's LRU from its reported KV cache (autoTune)
or `lruCapacityPerServer`. The match is kept in the cycle state so no-hit-lru-scorer reuses it.

Two config shapes set the block settings:
- GIE's: on the scorer itself (`blockSize` in characters, `maxPrefixBlocksToMatch`,
  `lruCapacityPerServer`, `autoTune`; `hashBlockSize`, GIE's older name of `blockSize`, loads with a
  deprecation warning).
- llm-d's: on an `approx-prefix-cache-producer` (`blockSizeTokens`, `maxPrefixTokensToMatch`, ...),
  which the scorer names in `prefixMatchInfoProducerName` (or the config's only producer). Bound to a
  producer, the scorer takes the producer's settings; giving them on the scorer as well is refused.
  Named in `prefixMatchInfoProducerName`, a `precise-prefix-cache-producer` gives the match instead
  (the KV-event index; nothing is recorded in the approximate one), or a `burst-prefix-cache-producer`
  (its window's joint placement: a full match on the replica it chose, nothing recorded either).

Score, as llm-d's: `matchLengthWeight * min(1, matched tokens / matchLengthScaleTokens)^2 +
(1 - matchLengthWeight) * matched blocks / prompt blocks` (weight 0 by default: the ratio alone).

`multicluster-prefix-cache-scorer` and `multicluster-approx-prefix-cache-producer` are the same plugins
under llm-d's cluster-scoped names (their endpoints are peer clusters).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import BLOCK_CHARS, DEFAULT_CAPACITY, MAX_BLOCKS, ApproxPrefixIndex, block_hashes
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource


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
    hashes = block_hashes(request.model, request.prompt_text, request.cache_salt, max_blocks, block_chars)
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
        self.producer_name: str | None = None  # prefixMatchInfoProducerName as given
        self.producer: ApproxPrefixCacheProducer | None = None  # bound by the loader
        self.precise: PrefixMatchSource | None = None  # a precise-prefix-cache-producer, bound by the loader
        self.own_settings: tuple[str, ...] = ()  # the GIE block settings given on the scorer itself
        self.match_length_weight = 0.0  # llm-d's matchLengthWeight: 0 = the ratio alone
        self.match_length_scale = DEFAULT_MATCH_LENGTH_SCALE

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrefixCacheScorer:
        scorer = cls(
            ctx.prefix_index,
            name,
            block_chars=_block_chars(p),  # characters, as in GIE
            max_blocks=p.integer("maxPrefixBlocksToMatch", MAX_BLOCKS, minimum=1),
            lru_capacity=p.integer("lruCapacityPerServer", DEFAULT_CAPACITY, minimum=1),
            auto_tune=p.flag("autoTune", True),
        )
        scorer.own_settings = tuple(k for k in (*_GIE_SETTINGS, HASH_BLOCK_SIZE) if p.given(k))
        scorer.producer_name = p.string("prefixMatchInfoProducerName")
        weight = p.number("matchLengthWeight", 0.0, minimum=0.0)
        if weight > 1.0:
            raise ParameterError("matchLengthWeight", f"must be between 0.0 and 1.0, got {weight:g}")
        scale = p.integer("matchLengthScaleTokens", DEFAULT_MATCH_LENGTH_SCALE)
        if weight > 0.0 and scale <= 0:
            raise ParameterError("matchLengthScaleTokens", f"must be > 0 when matchLengthWeight is > 0, got {scale}")
        scorer.match_length_weight, scorer.match_length_scale = weight, scale
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """Bind to the approx-prefix-cache-producer named (or the config's only one) and take its settings."""
        if self.producer_name is not None:
            found = plugins.get(self.producer_name)
            if isinstance(found, PrefixMatchSource) and not isinstance(found, (ApproxPrefixCacheProducer, PrefixCacheScorer)):
                if self.own_settings:  # a precise or burst producer: no approximate blocks to set
                    raise ParameterError(
                        self.own_settings[0],
                        f"this scorer reads the match of {getattr(found, 'type', '?')} {shown(found.name)}, which has no "
                        f"approximate block settings; remove {', '.join(self.own_settings)}",
                    )
                self.precise = found
                return
        producer = find_producer(plugins, self.producer_name)
        if producer is None:
            return  # GIE's shape: the scorer's own settings
        if self.own_settings:
            raise ParameterError(
                self.own_settings[0],
                f"this scorer takes its block settings from {ApproxPrefixCacheProducer.type} {shown(producer.name)} "
                f"(as in llm-d, where the scorer only reads the producer's match); set them there "
                f"(blockSizeTokens, maxPrefixTokensToMatch, lruCapacityPerServer, autoTune) and remove "
                f"{', '.join(self.own_settings)} here",
            )
        self.producer = producer
        self.block_chars = producer.block_chars
        self.max_blocks = producer.max_blocks
        self.lru_capacity = producer.lru_capacity
        self.auto_tune = producer.auto_tune

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        source = self.producer or self.precise
        if source is None:
            return given
        out = {k: v for k, v in given.items() if k not in _GIE_SETTINGS}
        out["prefixMatchInfoProducerName"] = source.name
        return out

    def prefix_matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """The match this scorer scores: the precise producer's, or the approximate index's."""
        if self.precise is not None:
            return self.precise.prefix_matches(request, cycle, endpoints)
        return approx_matches(request, cycle, self.index, self.block_chars, self.max_blocks, endpoints)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        if self.precise is None and self.match_length_weight == 0.0:  # the common case: one column
            m = prefix_match(request, cycle, self.index, self.block_chars, self.max_blocks)
            cols = cycle.columns(endpoints)
            if not m.hashes:
                return np.zeros(cols.size)
            return cols.scatter(m.matched) / len(m.hashes)
        matches = self.prefix_matches(request, cycle, endpoints)
        w, scale = self.match_length_weight, self.match_length_scale
        out: list[float] = []
        for ep in endpoints:
            held, total, block_tokens = matches.get(ep.address, (0, 0, 0))
            if not total:
                out.append(0.0)
                continue
            length = min(1.0, held * block_tokens / scale) ** 2 if w > 0.0 else 0.0
            out.append(w * length + (1.0 - w) * held / total)
        return out

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if self.precise is not None:  # the precise index follows KV events instead
            return
        record_pick(request, cycle, self.index, result, self)


class MulticlusterPrefixCacheScorer(PrefixCacheScorer):
    """multicluster-prefix-cache-scorer (llm-d): prefix-cache-scorer for a cluster-scoped EPP, routing a
    repeated prefix back to the peer cluster that served it: the stock scorer, under llm-d's
    cluster-scoped type name."""

    type = "multicluster-prefix-cache-scorer"


def approx_matches(
    request: InferenceRequest,
    cycle: CycleState,
    index: ApproxPrefixIndex,
    block_chars: int,
    max_blocks: int,
    endpoints: Sequence[Endpoint],
) -> dict[str, tuple[int, int, int]]:
    """The approximate match per endpoint as (blocks held, blocks in the prompt, tokens a block)."""
    m = prefix_match(request, cycle, index, block_chars, max_blocks)
    total, block_tokens = len(m.hashes), max(1, block_chars // CHARS_PER_TOKEN)
    return {ep.address: (m.matched.get(ep.address, 0), total, block_tokens) for ep in endpoints}


_GIE_SETTINGS = ("blockSize", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune")
HASH_BLOCK_SIZE = "hashBlockSize"  # GIE's name of blockSize until gateway-api-inference-extension#1613


def _block_chars(p: Params) -> int:
    """`blockSize` in characters, or GIE's older name for it, `hashBlockSize` (a deprecated alias: the
    same number; llm-d's strict parsing refuses it, GIE's old scorer read it). Both given is refused."""
    if not p.given(HASH_BLOCK_SIZE):
        return p.integer("blockSize", BLOCK_CHARS, minimum=1)
    if p.given("blockSize"):
        raise ParameterError(HASH_BLOCK_SIZE, "GIE's old name of blockSize; give blockSize only")
    chars = p.integer(HASH_BLOCK_SIZE, BLOCK_CHARS, minimum=1)
    del p.effective[HASH_BLOCK_SIZE]
    p.effective["blockSize"] = chars
    p.warnings.append(
        f"parameter {HASH_BLOCK_SIZE} is deprecated: GIE's old name of blockSize (renamed in GIE#1613), read as "
        f"blockSize: {chars} characters a block; llm-d's router refuses it, write blockSize"
    )
    return chars
DEFAULT_MATCH_LENGTH_SCALE = 8192  # llm-d's matchLengthScaleTokens

# llm-d's approx-prefix-cache-producer defaults, and its floor on the block size (llm-d-router #1158:
# smaller blocks make the index huge; routing matches at a coarser grain than the server caches).
PRODUCER_BLOCK_TOKENS = 16
MIN_BLOCK_TOKENS = 64
PRODUCER_MAX_BLOCKS = 2048
PRODUCER_MAX_TOKENS = 131_072
UNLIMITED_BLOCKS = sys.maxsize  # both caps 0: the whole prompt


class ApproxPrefixCacheProducer(Plugin):
    """llm-d's `approx-prefix-cache-producer`: the block settings of the approximate prefix match.

    llm-d hashes the prompt here and its prefix scorer, no-hit-lru scorer and P/D decider read the
    match. Here the prefix-cache-scorer bound to this producer hashes (once per request, shared through
    the cycle state) with these settings, which follow llm-d's:
    - block = max(64, blockSizeTokens) tokens (4 characters a token, as our prompt estimate);
    - blocks matched = maxPrefixTokensToMatch // block when > 0, else maxPrefixBlocksToMatch, 0 = all;
    - LRU per endpoint from the server's reported KV cache (autoTune) or lruCapacityPerServer.
    `blockSize` is llm-d's deprecated name of blockSizeTokens (used when blockSizeTokens is not given).
    One difference: llm-d's autoTune also takes the block size from the server's metrics; that changes
    anything only for servers whose KV blocks exceed 64 tokens (the floor), and here the block size is
    blockSizeTokens (floored), so every request hashes alike.
    """

    type = "approx-prefix-cache-producer"

    def __init__(
        self,
        name: str = "approx-prefix-cache-producer",
        *,
        index: ApproxPrefixIndex | None = None,
        block_tokens: int = PRODUCER_BLOCK_TOKENS,
        max_tokens: int = PRODUCER_MAX_TOKENS,
        max_blocks: int = PRODUCER_MAX_BLOCKS,
        lru_capacity: int = DEFAULT_CAPACITY,
        auto_tune: bool = True,
    ) -> None:
        self.name = name
        self.index = index if index is not None else ApproxPrefixIndex()  # the shared one (PluginContext)
        tokens = max(MIN_BLOCK_TOKENS, block_tokens)
        self.block_chars = tokens * CHARS_PER_TOKEN
        if max_tokens > 0:
            self.max_blocks = max_tokens // tokens
        else:
            self.max_blocks = max_blocks or UNLIMITED_BLOCKS
        self.lru_capacity = lru_capacity
        self.auto_tune = auto_tune

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ApproxPrefixCacheProducer:
        auto_tune = p.flag("autoTune", True)
        legacy = p.integer("blockSize", 0, minimum=0)
        if not legacy:
            del p.effective["blockSize"]  # deprecated: shown only when given
        block_tokens = p.integer("blockSizeTokens", legacy or PRODUCER_BLOCK_TOKENS, minimum=0 if auto_tune else 1)
        if legacy:
            p.warnings.append("parameter blockSize is deprecated: use blockSizeTokens (the same number, in tokens)")
        max_tokens = p.integer("maxPrefixTokensToMatch", PRODUCER_MAX_TOKENS, minimum=0)
        max_blocks = p.integer("maxPrefixBlocksToMatch", PRODUCER_MAX_BLOCKS, minimum=0)
        tokens = max(MIN_BLOCK_TOKENS, block_tokens)
        if 0 < max_tokens < tokens:
            raise ParameterError(
                "maxPrefixTokensToMatch",
                f"{max_tokens} is less than one block ({tokens} tokens), so nothing would be matched; "
                "use 0 for the whole prompt, or remove this producer to turn prefix matching off",
            )
        if p.given("blockSizeTokens") and block_tokens < MIN_BLOCK_TOKENS:
            p.warnings.append(f"blockSizeTokens {block_tokens} is below the minimum {MIN_BLOCK_TOKENS}; using {MIN_BLOCK_TOKENS} (as llm-d)")
        return cls(
            name,
            index=ctx.prefix_index,
            block_tokens=block_tokens,
            max_tokens=max_tokens,
            max_blocks=max_blocks,
            lru_capacity=p.integer("lruCapacityPerServer", DEFAULT_CAPACITY, minimum=1),
            auto_tune=auto_tune,
        )

    def prefix_matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """The approximate match with this producer's block settings (what its scorers read)."""
        return approx_matches(request, cycle, self.index, self.block_chars, self.max_blocks, endpoints)

class MulticlusterApproxPrefixCacheProducer(ApproxPrefixCacheProducer):
    """multicluster-approx-prefix-cache-producer (llm-d): approx-prefix-cache-producer for a cluster-scoped
    EPP. The index keys blocks by endpoint, and the endpoints are peer clusters, so it tracks (cluster,
    block): the stock producer, under llm-d's cluster-scoped type name."""

    type = "multicluster-approx-prefix-cache-producer"


class MatchSettings(Protocol):
    """What a prefix match and its recording take: a prefix scorer's or an approx-prefix-cache-producer's."""

    block_chars: int
    max_blocks: int
    lru_capacity: int
    auto_tune: bool


def find_producer(plugins: Mapping[str, object], name: str | None) -> ApproxPrefixCacheProducer | None:
    """The approx-prefix-cache-producer `prefixMatchInfoProducerName` names; without a name, the one named
    like its type (llm-d's default) or the config's only one; None when the config has none."""
    if name is not None:
        found = plugins.get(name)
        if found is None:
            raise ParameterError("prefixMatchInfoProducerName", f"no plugin named {shown(name)}; defined: {', '.join(plugins)}")
        if not isinstance(found, ApproxPrefixCacheProducer):
            raise ParameterError(
                "prefixMatchInfoProducerName",
                f"plugin {shown(name)} ({getattr(found, 'type', '?')}) is not an {ApproxPrefixCacheProducer.type}",
            )
        return found
    producers = {n: q for n, q in plugins.items() if isinstance(q, ApproxPrefixCacheProducer)}
    if not producers:
        return None
    if ApproxPrefixCacheProducer.type in producers:
        return producers[ApproxPrefixCacheProducer.type]
    if len(producers) == 1:
        return next(iter(producers.values()))
    raise ParameterError(
        "prefixMatchInfoProducerName",
        f"{len(producers)} {ApproxPrefixCacheProducer.type} plugins ({', '.join(producers)}); name the one this plugin reads",
    )


def match_source(plugins: Mapping[str, object], name: str | None) -> MatchSettings:
    """Where a plugin that reads the approximate prefix match takes its block settings from: the producer
    (see find_producer), else the config's prefix-cache-scorer (so both share one match), else the
    defaults of the approx-prefix-cache-producer llm-d creates when a config lists none."""
    producer = find_producer(plugins, name)
    if producer is not None:
        return producer
    scorer = next((q for q in plugins.values() if isinstance(q, PrefixCacheScorer)), None)
    return scorer if scorer is not None else ApproxPrefixCacheProducer()


def bind_match(plugins: Mapping[str, object], name: str | None) -> tuple[PrefixMatchSource | None, MatchSettings]:
    """What a plugin reading `prefixMatchInfoProducerName` reads: the precise-prefix-cache-producer it
    names (the KV-event match; the settings returned are then unused), else (None, match_source)."""
    found = plugins.get(name) if name is not None else None
    if isinstance(found, PrefixMatchSource) and not isinstance(found, (ApproxPrefixCacheProducer, PrefixCacheScorer)):
        return found, ApproxPrefixCacheProducer()
    return None, match_source(plugins, name)


def uncached_tokens(prompt_tokens: int, matched_blocks: int, total_blocks: int, block_tokens: int) -> int:
    """The prompt tokens an endpoint still has to compute, counted as llm-d's in-flight load counts them:
    the matched part's blocks it lacks, plus the prompt past the matched part (past the match cap)."""
    indexed = total_blocks * block_tokens
    return max(0, indexed - matched_blocks * block_tokens) + max(0, prompt_tokens - indexed)


def uncached_per_endpoint(
    request: InferenceRequest, cycle: CycleState, precise: PrefixMatchSource | None, index: ApproxPrefixIndex,
    settings: MatchSettings, endpoints: Sequence[Endpoint],
) -> list[int]:
    """This request's uncached prompt tokens on each endpoint (llm-d's UncachedRequestTokens), from the
    precise producer's KV-event match when one is bound, else the approximate match with `settings`."""
    prompt = request.prompt_tokens
    if precise is not None:
        m = precise.prefix_matches(request, cycle, endpoints)
        return [uncached_tokens(prompt, *m.get(ep.address, (0, 0, 0))) for ep in endpoints]
    pm = prefix_match(request, cycle, index, settings.block_chars, settings.max_blocks)
    total, bt, matched = len(pm.hashes), settings.block_chars // CHARS_PER_TOKEN, pm.matched
    return [uncached_tokens(prompt, matched.get(ep.address, 0), total, bt) for ep in endpoints]


def record_pick(
    request: InferenceRequest, cycle: CycleState, index: ApproxPrefixIndex, result: SchedulingResult, settings: MatchSettings
) -> None:
    """After the pick, the chosen endpoint (and a P/D prefill endpoint) holds the prompt's blocks. Done
    once per request for given block settings, however many plugins reading that match ask."""
    if not result.endpoints:
        return
    key = f"prefix-recorded/{settings.block_chars}/{settings.max_blocks}"
    if key in cycle.data:
        return
    cycle.data[key] = True
    m = prefix_match(request, cycle, index, settings.block_chars, settings.max_blocks)
    if not m.hashes:
        return
    ep = result.endpoints[0]
    index.record(ep.address, m.hashes, _capacity(ep, settings))
    if result.profile_results is not None:
        # P/D: the prefill endpoint computed the prompt's KV and keeps it in its cache too
        for chosen in result.profile_results.values():
            if chosen and chosen[0] is not ep:
                index.record(chosen[0].address, m.hashes, _capacity(chosen[0], settings))


def _capacity(ep: Endpoint, settings: MatchSettings) -> int:
    m = ep.metrics
    if settings.auto_tune and m.num_gpu_blocks:
        # the server's cache in tokens, over our block size in (estimated) tokens
        block_tokens = max(1, settings.block_chars // CHARS_PER_TOKEN)
        return max(1, m.num_gpu_blocks * (m.block_size or block_tokens) // block_tokens)
    return settings.lru_capacity
