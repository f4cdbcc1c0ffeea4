"""Precise prefix matching: the share of the prompt's leading KV blocks each endpoint really holds,
from the KV events its engine publishes (not from past routing, like the approximate index).

One implementation, configured two ways:
- `precise-prefix-cache-producer` (llm-d's shape: `tokenProcessorConfig`, `indexerConfig`,
  `kvEventsConfig`, `speculativeIndexing`): the match for a `prefix-cache-scorer` that names it in
  `prefixMatchInfoProducerName`; the request's tokens come from the config's `token-producer`.
- `precise-prefix-cache-scorer` (llm-epp's shape: `tokenizer`, `kvEventsPort`, ...): the same match,
  scored by the plugin itself, which tokenizes the request with its own tokenizer. In llm-d's shape
  (deprecated there) it reads the token-producer's tokens; with `indexerConfig.tokenizersPoolConfig`,
  llm-d's legacy tokenization pool, it also brings a token-producer of its own (the uds backend, built
  by pickers.plugins.producer.tokens.tokenizers_pool), asked for what the config's gave no ids.

The tokens are cut into each engine's blocks (its block size comes from its events), keyed like
`pickers.indexes.kv_blocks`, and matched against the index the plugin owns. The EPP
(extproc.server.runner) feeds that index: it starts a KV-event subscriber for the plugin and
attaches it as `subscriber`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import (
    ENDPOINT_NOTIFICATION_SOURCE,
    CycleState,
    SchedulingResult,
)
from pickers.indexes.kv_blocks import (
    GPU,
    MAX_MEDIA,
    DEFAULT_CAPACITY,
    IndexMetrics,
    KVBlockIndex,
    TierWeights,
    request_keys,
)
from pickers.indexes.tokenization import RequestTokenizer, Tokenizer, load_tokenizer
from pickers.plugins.base import Plugin, PluginContext, TokenPoolFactory, TokenSource

DEFAULT_BLOCK_SIZE = 16  # until an endpoint's events tell its real block size (vLLM's default, llm-d's too)
MAX_BLOCKS = 256
DEFAULT_KV_EVENTS_PORT = 5557
# llm-d's defaults (llm-d-kv-cache): in-memory index of 1e8 keys, 10 endpoints per key, topic "kv@",
# tier weights gpu 1.0 / cpu 0.8, speculative entries living 2 s
LLMD_INDEX_KEYS = 100_000_000
LLMD_PODS_PER_KEY = 10
LLMD_TOPIC_FILTER = "kv@"
LLMD_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}
SPECULATIVE_TTL = "2s"
MAX_SPECULATIVE = 1_000_000  # speculative (key, endpoint) entries at most: past it the oldest go early (ours)
LLMD_MAX_TOKENS = DEFAULT_BLOCK_SIZE * 8192  # the producer matches the whole prompt, up to 128K tokens

ENGINE_TYPES = ("vllm", "sglang")  # llm-d's engineType: the engines whose KV events are decoded
CPU_TIER = "cpu"  # the medium a P2P pull is served from (vLLM's OffloadingConnector CPU tier)
TOKEN_PRODUCER = "token-producer"
TOKENIZERS_POOL = "tokenizersPoolConfig"
# llm-d's words, logged each time its factory builds the scorer
SCORER_DEPRECATION = ("DEPRECATION: precise-prefix-cache-scorer is deprecated; configure precise-prefix-cache-producer + "
                      "prefix-cache-scorer with prefixMatchInfoProducerName: precise-prefix-cache-producer")  # fmt: skip
_LEGACY_SHAPE = ("tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "speculativeIndexing", "speculativeTTL")


class PrecisePrefixCacheProducer(Plugin):
    """llm-d's `precise-prefix-cache-producer`: the KV-event index and each endpoint's match in it.

    Parameters, as llm-d's (llm-d-kv-cache's configuration), and what they do here:
    - `tokenProcessorConfig.blockSizeTokens` (16; `blockSize` is its deprecated name): the block size
      assumed for an endpoint until its events tell its own; blocks are matched at each engine's
      block size (llm-d re-chunks to this size; a finer grain counts the same tokens or more).
      `hashSeed` seeds every key chain; `hashAlgorithm` (cbor-fnv, xxh64) names llm-d's key hash:
      keys are internal to the EPP (ours are xxh64 either way), so it changes no routing.
    - `indexerConfig.kvBlockIndexConfig.inMemoryConfig`: `size` (1e8) distinct keys at most,
      `podCacheSize` (10) endpoints per key, the least recently stored dropped first. Redis and
      cost-aware indexes and `tokenizersPoolConfig` (as llm-d: only its old scorer takes the pool)
      are refused with the reason. `enableMetrics`
      (false) counts llm-d's kvblock index metrics (`index.metrics`, exported by the EPP);
      `metricsLoggingInterval` (0: off; nanoseconds, as llm-d's, or a duration like "1m") has the EPP
      log them at that interval, only with `enableMetrics` (as llm-d).
    - `indexerConfig.kvCacheBackendConfigs` ([gpu 1.0, cpu 0.8]): each medium's weight. An endpoint's
      match is llm-d's longest-prefix score: over its leading blocks (up to the first it holds on no
      medium), the sum of the largest weight among the media holding each block (a medium not
      listed, or a speculative entry, 1.0), truncated to whole blocks (llm-d's `matchBlocks`).
    - `kvEventsConfig`: `discoverPods` (true) subscribes to every endpoint of the pool at
      `podDiscoveryConfig.socketPort` (5557) plus the endpoint's data-parallel rank, as llm-d dials
      (the endpoint label `llm-epp/kv-events-port` names the port exactly); `zmqEndpoint` binds one socket the engines connect to, the endpoint named by the topic
      `kv@<ip:port>@<model>`; `topicFilter` ("kv@") is the subscription prefix. `engineType` `vllm`
      (default) or `sglang` (the same positional encoding; its batches' DP rank is not read, as in llm-d).
      Newer llm-d's data-parallel settings (extproc.datalayer.kv_events): `servingPortBase` (0: off)
      with `dataParallelSizeLocal` (1) attributes a batch stamped with DP rank R to the endpoint
      `<host>:(servingPortBase + R % dataParallelSizeLocal)` and keeps R as its global rank;
      `podDiscoveryConfig.dataParallelSizeTotal` (1) > 1 dials every pod at socketPort + i, i < it.
    - `speculativeIndexing` (false): after a pick, the chosen endpoints hold the request's blocks for
      `speculativeTTL` (2s) before their engines' events confirm them.
    """

    type = "precise-prefix-cache-producer"

    def __init__(
        self,
        name: str = "precise-prefix-cache-producer",
        *,
        index: KVBlockIndex | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = LLMD_MAX_TOKENS // DEFAULT_BLOCK_SIZE,
        discover_pods: bool = True,
        kv_events_port: int = DEFAULT_KV_EVENTS_PORT,
        zmq_endpoint: str | None = None,
        topic_filter: str = LLMD_TOPIC_FILTER,
        speculative_ttl: float | None = None,
        tier_weights: Mapping[str, float] | None = None,
        metrics_logging_interval: float | None = None,
        serving_port_base: int = 0,
        dp_size_local: int = 1,
        dp_size_total: int = 1,
        engine: str = "vllm",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        # llm-d's kvEventsConfig.servingPortBase / dataParallelSizeLocal (rank-granular identity; 0: off),
        # podDiscoveryConfig.dataParallelSizeTotal and engineType: how the EPP's subscriber dials and attributes
        self.serving_port_base = serving_port_base
        self.dp_size_local = dp_size_local
        self.dp_size_total = dp_size_total
        self.engine = engine
        self.index = index if index is not None else KVBlockIndex()
        # medium -> weight (llm-d's kvCacheBackendConfigs); None: a block on any medium counts 1
        self.tier_weights = TierWeights(self.index, tier_weights) if tier_weights is not None else None
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.discover_pods = discover_pods  # one subscription per endpoint of the pool
        self.kv_events_port = kv_events_port  # 0: only endpoints that name theirs in a label
        self.zmq_endpoint = zmq_endpoint  # bind here for engines that connect (llm-d's global socket)
        self.topic_filter = topic_filter
        self.subscriber: Any = None  # the EPP's extproc.datalayer.kv_events.KVEventSubscriber, once started
        self.token_source: TokenSource | None = None  # the token-producer bound (None: no real tokens)
        self.bind_warnings: list[str] = []  # for the loader: no real tokens to match
        self.speculative_ttl = speculative_ttl  # None: speculative indexing off
        # seconds between the EPP's log lines of the index's metrics (None: none; needs index.metrics)
        self.metrics_logging_interval = metrics_logging_interval if self.index.metrics is not None else None
        self._clock = clock
        self._speculative: dict[int, dict[str, float]] = {}  # key -> endpoint -> expiry
        self._speculative_order: deque[tuple[float, int, str]] = deque()

    @property
    def subscribe(self) -> bool:
        """Whether the EPP feeds this index from KV events."""
        return self.discover_pods or bool(self.zmq_endpoint)

    def extracts(self, source_type: str) -> bool:
        """An extractor of an endpoint-notification-source (pickers.framework.types.EndpointExtractor):
        each endpoint that joins the pool gets a KV-event subscription, one that leaves loses it."""
        return source_type == ENDPOINT_NOTIFICATION_SOURCE

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrecisePrefixCacheProducer:
        return cls(name, **llmd_settings(p))

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """Read the request's tokens from the config's token-producer (llm-d requires one upstream)."""
        sources = [q for q in plugins.values() if isinstance(q, TokenSource)]
        if len(sources) > 1:
            named = [q for q in sources if q.name == TOKEN_PRODUCER]
            if not named:
                raise ParameterError(
                    "", f"{len(sources)} token producers ({', '.join(q.name for q in sources)}); name the one this "
                    f"producer reads {TOKEN_PRODUCER}, llm-d's default",
                )
            sources = named
        self.token_source = sources[0] if sources else None
        no_tokens = (
            f"no {TOKEN_PRODUCER} gives the model's token ids (its vllm or local backend): the tokens are estimated, "
            "as in llm-d, and estimated tokens never match an engine's KV blocks"
        )
        self.bind_warnings = [] if self.real_tokens else [no_tokens]

    @property
    def real_tokens(self) -> bool:
        """Whether the bound token-producer gives the engine's token ids (not an estimate)."""
        return isinstance(self.token_source, TokenSource) and self.token_source.token_backend != "estimate"

    def tokens(self, request: InferenceRequest, max_tokens: int) -> Sequence[int]:
        """The request's token ids, at most `max_tokens` (none when no token-producer tokenized it)."""
        ids = request.prompt_token_ids
        if not ids:
            return ()
        return ids if len(ids) <= max_tokens else ids[:max_tokens]

    def global_dp_rank(self, address: str) -> int | None:
        """The engine's global data-parallel rank behind `address`, as its KV events name it; known only
        with `servingPortBase` (llm-d's GlobalDPRank: pod-granular identity records no rank)."""
        return self.index.global_dp_rank(address)

    def block_size_for(self, address: str) -> int:
        return self.index.block_size_of(address) or self.block_size

    def matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int]]:
        """address -> (leading blocks held, tier-weighted and truncated as llm-d's matchBlocks; blocks
        in the prompt); keys and lookups once per cycle and block size, whichever profile asks."""
        key = f"precise-prefix/{self.name}"
        state = cycle.data.get(key)
        if not isinstance(state, _CycleMatch):
            sizes = {self.block_size_for(ep.address) for ep in endpoints} or {self.block_size}
            ids = self.tokens(request, max(sizes) * self.max_blocks)
            lora = request.model if request.model in self.index.lora_names else None
            state = cycle.data[key] = _CycleMatch(ids, lora)
        self._expire()
        extra = self._speculative or None
        out: dict[str, tuple[int, int]] = {}
        for ep in endpoints:
            size = self.block_size_for(ep.address)
            found = state.by_size.get(size)
            if found is None:
                keys = request_keys(state.ids, size, self.max_blocks, state.lora, self.index.hash_seed)
                found = state.by_size[size] = (keys, self.held(keys, extra))
            keys, matched = found
            out[ep.address] = (matched.get(ep.address, 0), len(keys))
        return out

    def held(self, keys: Sequence[int], extra: Mapping[int, Mapping[str, object]] | None = None) -> dict[str, int]:
        """Leading blocks each endpoint holds, weighted by the media holding them (see the class)."""
        return self.index.lookup(keys, self.tier_weights, extra)

    def prefix_matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """address -> (blocks matched, blocks in the prompt, tokens a block): llm-d's PrefixCacheMatchInfo."""
        return {a: (held, total, self.block_size_for(a)) for a, (held, total) in self.matches(request, cycle, endpoints).items()}

    def pull_matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """address -> (tokens of its leading blocks on the CPU tier, which a P2P pull is served from;
        tokens of its leading blocks on any tier, speculative ones too; tokens a block), as llm-d's
        PrefixCacheMatchInfo gives p2p-source-producer (CachedBlocksByTier["cpu"], CachedBlockCount)."""
        self.matches(request, cycle, endpoints)  # the keys of each block size, once per cycle
        state = cycle.data[f"precise-prefix/{self.name}"]
        assert isinstance(state, _CycleMatch)
        extra = self._speculative or None
        out: dict[str, tuple[int, int, int]] = {}
        per_size: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
        for ep in endpoints:
            size = self.block_size_for(ep.address)
            found = per_size.get(size)
            if found is None:
                keys = state.by_size[size][0]
                found = per_size[size] = (self.index.medium_match(keys, CPU_TIER), self.index.match(keys, extra))
            cpu, held = found
            out[ep.address] = (cpu.get(ep.address, 0) * size, held.get(ep.address, 0) * size, size)
        return out

    # -- speculative indexing ------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """With speculativeIndexing: the chosen endpoints (each profile's first) hold the request's
        blocks until the TTL runs out, so the next request with this prefix follows before the
        engine's own events arrive."""
        ttl = self.speculative_ttl
        state = cycle.data.get(f"precise-prefix/{self.name}")
        if ttl is None or not result.endpoints or not isinstance(state, _CycleMatch) or not state.ids:
            return
        chosen = [result.endpoints[0]]
        if result.profile_results is not None:
            chosen += [eps[0] for eps in result.profile_results.values() if eps and eps[0] is not result.endpoints[0]]
        expires = self._clock() + ttl
        for ep in chosen:
            size = self.block_size_for(ep.address)
            found = state.by_size.get(size)
            keys = found[0] if found else request_keys(state.ids, size, self.max_blocks, state.lora, self.index.hash_seed)
            for k in keys:
                self._speculative.setdefault(k, {})[ep.address] = expires
                self._speculative_order.append((expires, k, ep.address))
            if self.index.metrics is not None:  # llm-d adds speculative entries to its index: admissions
                self.index.metrics.admissions += len(keys)
        while len(self._speculative_order) > MAX_SPECULATIVE:  # a burst of long prompts: bounded all the same
            self._drop_oldest_speculative()

    def _expire(self) -> None:
        order = self._speculative_order
        if not order:
            return
        now = self._clock()
        while order and order[0][0] <= now:
            self._drop_oldest_speculative()

    def _drop_oldest_speculative(self) -> None:
        expires, k, address = self._speculative_order.popleft()
        holders = self._speculative.get(k)
        if holders is not None and holders.get(address) == expires:  # not renewed since
            del holders[address]
            if not holders:
                del self._speculative[k]
            if self.index.metrics is not None:  # llm-d evicts an expired speculative entry from its index
                self.index.metrics.evictions += 1

    def speculative_entries(self) -> int:
        self._expire()
        return sum(len(h) for h in self._speculative.values())


class _CycleMatch:
    """One cycle's tokens and, per block size, the request's keys and who holds them."""

    __slots__ = ("by_size", "ids", "lora")

    def __init__(self, ids: Sequence[int], lora: str | None) -> None:
        self.ids = ids
        self.lora = lora
        self.by_size: dict[int, tuple[list[int], dict[str, int]]] = {}


class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer):
    """precise-prefix-cache-scorer: the precise match, scored (leading blocks held / blocks in the
    prompt). llm-epp's shape tokenizes with the plugin's own `tokenizer`; llm-d's (the producer's
    parameters, deprecated in llm-d for producer + prefix-cache-scorer) reads the token-producer's,
    and with `indexerConfig.tokenizersPoolConfig` brings its own (`token_pool`, `implied_producers`):
    as llm-d's legacy pool, it tokenizes a request only when no token-producer gave it ids."""

    type = "precise-prefix-cache-scorer"
    category = "affinity"

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        name: str = "precise-prefix-cache-scorer",
        *,
        index: KVBlockIndex | None = None,
        tokenize_budget: float = 0.05,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = MAX_BLOCKS,
        subscribe: bool = True,
        kv_events_port: int = DEFAULT_KV_EVENTS_PORT,
        token_pool: TokenSource | None = None,
        **llmd: Any,
    ) -> None:
        subscribe = llmd.pop("discover_pods", subscribe)
        super().__init__(
            name, index=index, block_size=block_size, max_blocks=max_blocks, discover_pods=subscribe,
            kv_events_port=kv_events_port, topic_filter=llmd.pop("topic_filter", ""), **llmd,
        )  # fmt: skip
        self.tokenize = RequestTokenizer(tokenizer, tokenize_budget) if tokenizer is not None else None
        # the token-producer its tokenizersPoolConfig implies (llm-d's legacy pool); a reload that keeps
        # this scorer keeps it too (the copy shares it), with the client the EPP wired
        self.token_pool = token_pool

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrecisePrefixCacheScorer:
        if any(p.given(k) for k in _LEGACY_SHAPE) and not p.given("tokenizer"):
            p.warnings.append(SCORER_DEPRECATION)
            return cls(None, name, **llmd_settings(p, ctx.tokenizers_pool, f"{name}/{TOKENIZERS_POOL}"))
        spec = p.string("tokenizer", required=True)
        assert spec is not None
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as e:  # a missing folder, a broken tokenizer.json
            raise ParameterError("tokenizer", f"cannot load a tokenizer from {spec!r}: {e}") from None
        index = KVBlockIndex(p.integer("capacityPerEndpoint", DEFAULT_CAPACITY, minimum=1))
        port = p.integer("kvEventsPort", DEFAULT_KV_EVENTS_PORT, minimum=0)  # 0: only endpoints with the port label
        subscribe = p.flag("subscribe", True)
        for k in _LEGACY_SHAPE:
            p.refused(k, f"llm-d's {PrecisePrefixCacheProducer.type} parameter; with `tokenizer` this scorer takes llm-epp's")
        return cls(
            tokenizer, name, index=index,
            tokenize_budget=p.number("tokenizeBudgetMs", 50.0, minimum=0.0) / 1000.0,
            block_size=p.integer("blockSize", DEFAULT_BLOCK_SIZE, minimum=1),
            max_blocks=p.integer("maxPrefixBlocksToMatch", MAX_BLOCKS, minimum=1),
            subscribe=subscribe, kv_events_port=port,
        )  # fmt: skip

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        if self.tokenize is None and self.token_pool is None:
            super().bind_config(plugins, profiles, handler)

    def implied_producers(self) -> tuple[object, ...]:
        """The token-producer of its tokenizersPoolConfig, for the config to run after its own
        (pickers.plugins.base.ImpliesProducers)."""
        return () if self.token_pool is None else (self.token_pool,)

    @property
    def real_tokens(self) -> bool:
        return self.tokenize is not None or self.token_pool is not None or super().real_tokens

    def tokens(self, request: InferenceRequest, max_tokens: int) -> Sequence[int]:
        if self.tokenize is None:
            return super().tokens(request, max_tokens)
        return self.tokenize.tokens(request, max_tokens)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        m = self.matches(request, cycle, endpoints)
        return [(held / total if total else 0.0) for held, total in (m[ep.address] for ep in endpoints)]


def llmd_settings(p: Params, tokenizers_pool: TokenPoolFactory | None = None, pool_name: str = "") -> dict[str, Any]:
    """llm-d's precise-prefix-cache-producer parameters, read into the producer's settings. With
    `tokenizers_pool` (the old scorer's), `indexerConfig.tokenizersPoolConfig` is read too: its
    token-producer, named `pool_name`, is `token_pool`; without, it is refused, as llm-d's producer does."""
    tp = p.section("tokenProcessorConfig")
    legacy = tp.integer("blockSize", 0, minimum=0)
    if legacy:
        p.warnings.append("parameter tokenProcessorConfig.blockSize is deprecated: use blockSizeTokens (the same number)")
    else:
        del tp.effective["blockSize"]  # deprecated: shown only when given
    block = tp.integer("blockSizeTokens", 0, minimum=0) or legacy or DEFAULT_BLOCK_SIZE  # 0: unset, as in llm-d
    tp.effective["blockSizeTokens"] = block
    seed = tp.string("hashSeed", "") or ""
    algorithm = tp.string("hashAlgorithm", "cbor-fnv") or "cbor-fnv"
    if algorithm not in ("cbor-fnv", "xxh64"):
        raise ParameterError("tokenProcessorConfig.hashAlgorithm", f"expected cbor-fnv or xxh64, got {shown(algorithm)}")
    tp.effective["hashAlgorithm"] = algorithm

    ix = p.section("indexerConfig")
    pool: dict[str, TokenSource] = {}
    if tokenizers_pool is not None and ix.given(TOKENIZERS_POOL):
        pool["token_pool"] = tokenizers_pool(pool_name, ix.section(TOKENIZERS_POOL))
    else:  # null loads as left out, as in llm-d
        ix.refused(TOKENIZERS_POOL, "this producer reads the request's tokens from a token-producer (as in llm-d, which "
                   "refuses it here too; only its deprecated precise-prefix-cache-scorer takes the pool); configure a token-producer")  # fmt: skip
    kbi = ix.section("kvBlockIndexConfig")
    kbi.refused("redisConfig", "the index is kept in memory, one per EPP replica; there is no Redis backend")
    kbi.refused("costAwareMemoryConfig", "only the in-memory index (inMemoryConfig: size in keys) is implemented")
    mem = kbi.section("inMemoryConfig")
    max_keys = mem.integer("size", LLMD_INDEX_KEYS, minimum=1)
    pods_per_key = mem.integer("podCacheSize", LLMD_PODS_PER_KEY, minimum=1)
    metrics = IndexMetrics() if kbi.flag("enableMetrics", False) else None
    log_every = kbi.nanos_or_duration("metricsLoggingInterval")  # seconds, None: off
    if log_every and metrics is None:
        p.warnings.append("indexerConfig.kvBlockIndexConfig.metricsLoggingInterval has no effect without enableMetrics: "
                          "true (as in llm-d): nothing is counted to log")  # fmt: skip
    tier_weights = _tier_weights(ix)

    kv = p.section("kvEventsConfig")
    zmq_endpoint = kv.string("zmqEndpoint", "") or None
    topic_filter = kv.string("topicFilter", LLMD_TOPIC_FILTER) or ""
    if kv.given("concurrency"):
        kv.integer("concurrency", 4, minimum=1)
        p.warnings.append("kvEventsConfig.concurrency has no effect: events are decoded on the EPP's event loop, in order per endpoint")
    else:
        kv.effective["concurrency"] = 4
    engine = kv.string("engineType", "vllm") or "vllm"
    if engine not in ENGINE_TYPES:
        raise ParameterError("kvEventsConfig.engineType", f"expected one of {', '.join(ENGINE_TYPES)}, got {shown(engine)}")
    kv.effective["engineType"] = engine
    discover = kv.flag("discoverPods", True)
    serving_base = kv.integer("servingPortBase", 0, minimum=0)
    local = kv.integer("dataParallelSizeLocal", 1, minimum=0) or 1  # 0: unset, one rank a pod
    kv.effective["dataParallelSizeLocal"] = local
    if serving_base and serving_base + local - 1 > 65535:
        raise ParameterError("kvEventsConfig.servingPortBase", f"servingPortBase {serving_base} + dataParallelSizeLocal "
                             f"{local} - 1 is past the last port (65535)")  # fmt: skip
    if serving_base and engine == "sglang":
        p.warnings.append("kvEventsConfig.servingPortBase has no effect with engineType sglang: SGLang's batches' "
                          "data-parallel rank is not read (as in llm-d), so events keep the endpoint they arrive for")  # fmt: skip
    elif kv.given("dataParallelSizeLocal") and not serving_base:
        p.warnings.append("kvEventsConfig.dataParallelSizeLocal has no effect without servingPortBase (as in llm-d): "
                          "events keep the endpoint they arrive for")  # fmt: skip
    pod = kv.section("podDiscoveryConfig")
    unused = "llm-d's EPP does not read it either: every endpoint of the pool is followed"
    pod.deprecated("podLabelSelector", unused)
    pod.deprecated("podNamespace", unused)
    port = pod.integer("socketPort", DEFAULT_KV_EVENTS_PORT, minimum=1)
    total = pod.integer("dataParallelSizeTotal", 1, minimum=0) or 1
    pod.effective["dataParallelSizeTotal"] = total
    if total > 1 and not discover:
        p.warnings.append("kvEventsConfig.podDiscoveryConfig.dataParallelSizeTotal has no effect with discoverPods: "
                          "false: no pod is dialed")  # fmt: skip
    pod.refused("replaySocketPort", "replaying missed events is not implemented: after lost events the endpoint's "
                "entries are dropped and rebuilt from the events that follow",
                allowed=lambda v: isinstance(v, int) and not isinstance(v, bool) and v <= 0)  # fmt: skip
    if not discover and not zmq_endpoint:
        p.warnings.append("kvEventsConfig: discoverPods is false and no zmqEndpoint is set, so no KV events feed this index")

    speculative = p.flag("speculativeIndexing", False)
    ttl = p.duration_or("speculativeTTL", SPECULATIVE_TTL)
    if ttl <= 0:
        ttl = 2.0  # as llm-d: a zero or negative TTL means the default
    return {
        "index": KVBlockIndex(DEFAULT_CAPACITY, max_keys=max_keys, pods_per_key=pods_per_key, hash_seed=seed, metrics=metrics),
        "block_size": block,
        "max_blocks": max(1, LLMD_MAX_TOKENS // block),
        "discover_pods": discover,
        "kv_events_port": port,
        "zmq_endpoint": zmq_endpoint,
        "topic_filter": topic_filter,
        "speculative_ttl": ttl if speculative else None,
        "tier_weights": tier_weights,
        "metrics_logging_interval": log_every,
        "serving_port_base": serving_base,
        "dp_size_local": local,
        "dp_size_total": total,
        "engine": engine,
        **pool,
    }


def _tier_weights(ix: Params) -> dict[str, float]:
    """`indexerConfig.kvCacheBackendConfigs`: medium name -> weight (llm-d's default when left out;
    an empty list weighs every medium 1.0, as in llm-d)."""
    field = "kvCacheBackendConfigs"
    if not ix.given(field):
        ix.mappings(field)  # read (and shown) as llm-d's default
        ix.effective[field] = [{"name": n, "weight": w} for n, w in LLMD_TIER_WEIGHTS.items()]
        return dict(LLMD_TIER_WEIGHTS)
    weights: dict[str, float] = {}
    for i, backend in enumerate(ix.mappings(field)):
        where = ix.path(f"{field}[{i}]")
        extra = sorted(set(backend) - {"name", "weight"})
        if extra:
            raise ParameterError(f"{where}.{extra[0]}", "unknown field; a KV-cache backend takes name and weight")
        name, weight = backend.get("name"), backend.get("weight")
        if not isinstance(name, str) or not name:
            raise ParameterError(f"{where}.name", f"expected a medium name such as gpu or cpu, got {shown(name)}")
        if name != name.lower():
            raise ParameterError(f"{where}.name", f"{shown(name)}: media are matched lower-case (an event's CPU is cpu); write {name.lower()}")
        if name in weights:
            raise ParameterError(f"{where}.name", f"duplicate medium {shown(name)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ParameterError(f"{where}.weight", f"expected a number from 0.0 to 1.0 (a block's share of a GPU block), got {shown(weight)}")
        weights[name] = float(weight)
    named = [n for n in weights if n != GPU]
    if len(named) > MAX_MEDIA:
        raise ParameterError(ix.path(field), f"{len(named)} media besides gpu; the index tells at most {MAX_MEDIA} apart "
                             f"(one byte per holder), so {shown(named[MAX_MEDIA])} and after would weigh 1.0")
    ix.effective[field] = [{"name": n, "weight": w} for n, w in weights.items()]
    return weights


def precise_indexes(plugins: Iterable[object]) -> dict[str, PrecisePrefixCacheProducer]:
    """plugin name -> each distinct precise index among these plugins (producers and scorers), for the
    EPP to feed and for the metrics and the admin views."""
    out: dict[str, PrecisePrefixCacheProducer] = {}
    for plugin in plugins:
        if isinstance(plugin, PrecisePrefixCacheProducer):
            out.setdefault(plugin.name, plugin)
    return out


def precise_scorers(profiles: Iterable[Any]) -> dict[str, PrecisePrefixCacheProducer]:
    """The precise indexes of these scheduling profiles' plugins (see `precise_indexes`)."""
    return precise_indexes(p for prof in profiles for p in prof.plugins())
