"""mm-embeddings-cache-producer and mm-embeddings-cache-scorer (llm-d): send a request to the endpoint
that probably still holds the encoder output of its images, videos and audio.

The producer names each unique multimodal item of a request (pickers.indexes.encoder_cache: vLLM's own
hashes when a token-producer's render call or a generate body gave them, else a hash of the part as
sent) and matches them against one LRU per endpoint of the items routed there, before the profiles run;
after the pick it records the request's items for the chosen endpoint and, when several profiles ran,
for the prefill pick and the encoders (E/P/D: `x-encoder-hosts-ports`), which computed the embeddings.
llm-d records the primary (decode) profile's targets only, fallbacks included, so the scorer in an
`encode` profile there never sees a hit; here fallbacks, which served nothing, are not recorded.
`cacheSizeInMBPerServer` (4096) sizes each LRU as llm-d does: 2 MiB an item, so 2048 entries.

The scorer: matched items / the request's items per endpoint (every item weighs 1); 0 everywhere for a
request without multimodal items. `producerName` names the producer it reads; without it, the
config's producer (named like its type, or its only one), else one with the defaults, as llm-d
creates one. A request with no items costs a truth test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import (
    ENDPOINT_NOTIFICATION_SOURCE,
    CycleState,
    SchedulingResult,
)
from pickers.indexes.encoder_cache import (
    NO_MATCH,
    EncoderCacheIndex,
    EncoderCacheMatch,
    media_items,
)
from pickers.plugins.base import Plugin, PluginContext, configured_plugin

DEFAULT_CACHE_MB = 4096  # llm-d's default budget per endpoint, in MiB
MB_PER_ITEM = 2  # llm-d's fixed assumption: an item's embeddings take 2 MiB


def entries_for(cache_mb: int) -> int:
    """LRU entries per endpoint for a budget in MiB, as llm-d derives them (at least one)."""
    return max(1, cache_mb // MB_PER_ITEM)


class MMEmbeddingsCacheProducer(Plugin):
    type = "mm-embeddings-cache-producer"

    def __init__(self, name: str = "mm-embeddings-cache-producer", *, cache_mb: int = DEFAULT_CACHE_MB) -> None:
        self.name = name
        self.cache_mb = cache_mb
        self.index = EncoderCacheIndex(entries_for(cache_mb))
        # per index, not per name: a reload's copy shares the index, two implied producers do not
        self._match_key = f"mm-embeddings-cache/{id(self.index)}"
        self._recorded_key = f"mm-embeddings-cache-recorded/{id(self.index)}"
        # the addresses of the last candidates tuple seen (the datastore's, rebuilt only when the pool
        # changes), so observing the hit ratios costs nothing per endpoint that holds no item
        self._candidates: tuple[Endpoint, ...] = ()
        self._addresses: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MMEmbeddingsCacheProducer:
        p.refused("cacheSizeInMB", "the per-endpoint budget is cacheSizeInMBPerServer (llm-d's strict parsing refuses this name too)")
        p.refused("cacheSize", "an older llm-d's entry count; the per-endpoint budget is cacheSizeInMBPerServer (MiB, 2 MiB an item)")
        p.refused("cacheSizeInEmbeddingsPerServer", "a later llm-d's embedding-count capacity; this one sizes by cacheSizeInMBPerServer")
        mb = p.integer("cacheSizeInMBPerServer", DEFAULT_CACHE_MB)
        if mb <= 0:
            p.warnings.append(f"cacheSizeInMBPerServer {mb} is not positive; using {DEFAULT_CACHE_MB} (as llm-d)")
            mb = p.effective["cacheSizeInMBPerServer"] = DEFAULT_CACHE_MB
        return cls(name, cache_mb=mb)

    def extracts(self, source_type: str) -> bool:
        """An extractor of an endpoint-notification-source, as in llm-d: an endpoint that leaves takes its
        entries with it (`remove_endpoint`, which the EPP calls whether or not the config wires it)."""
        return source_type == ENDPOINT_NOTIFICATION_SOURCE

    def match(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint] = ()) -> EncoderCacheMatch:
        """The request's items and who holds them, once per cycle (the first caller's candidates are
        the ones whose hit ratios are observed)."""
        found = cycle.data.get(self._match_key)
        if isinstance(found, EncoderCacheMatch):
            return found
        if request.media is None and request.media_hashes is None:
            m = NO_MATCH
        else:
            m = self.index.match(media_items(request))
            if m.total:
                self.index.observe(m, self._addresses_of(endpoints))
        cycle.data[self._match_key] = m
        return m

    def _addresses_of(self, endpoints: Sequence[Endpoint]) -> frozenset[str]:
        if endpoints is self._candidates:
            return self._addresses
        addresses = frozenset(ep.address for ep in endpoints)
        if isinstance(endpoints, tuple):
            self._candidates, self._addresses = endpoints, addresses
        return addresses

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        self.match(request, cycle, endpoints)

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """The chosen endpoint (and the prefill and encode picks) now holds the request's items; once
        per request, however many plugins ask."""
        if not result.endpoints or self._recorded_key in cycle.data:
            return
        cycle.data[self._recorded_key] = True
        m = self.match(request, cycle)
        if not m.items:
            return
        keys = [item.key for item in m.items]
        chosen = [result.endpoints[0]]
        if result.profile_results is not None:
            chosen += [eps[0] for eps in result.profile_results.values() if eps]
        chosen += result.encoders or ()
        for address in dict.fromkeys(ep.address for ep in chosen):
            self.index.record(address, keys)

    def remove_endpoint(self, address: str) -> None:
        self.index.remove_endpoint(address)


class MMEmbeddingsCacheScorer(Plugin):
    type = "mm-embeddings-cache-scorer"
    category = "affinity"

    def __init__(self, name: str = "mm-embeddings-cache-scorer") -> None:
        self.name = name
        self.producer_name: str | None = None  # producerName as given
        self.producer = MMEmbeddingsCacheProducer()  # llm-d's default until bound
        self._bound: str | None = None  # the config's producer bound, for check-config

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MMEmbeddingsCacheScorer:
        scorer = cls(name)
        scorer.producer_name = p.string("producerName") or None  # llm-d: empty = the default producer
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        found = configured_plugin(plugins, self.producer_name, MMEmbeddingsCacheProducer, "producerName")
        if found is not None:
            self.producer = found
            self._bound = next(n for n, q in plugins.items() if q is found)

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, "producerName": self._bound} if self._bound is not None else given

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        m = self.producer.match(request, cycle, endpoints)
        if not m.matched:
            return [0.0] * len(endpoints)
        total, matched = m.total, m.matched
        return [matched.get(ep.address, 0) / total for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.producer.pre_request(request, cycle, result)  # once per request, with a configured producer too

    def remove_endpoint(self, address: str) -> None:
        self.producer.remove_endpoint(address)


def encoder_caches(plugins: Sequence[object]) -> dict[str, MMEmbeddingsCacheProducer]:
    """producer name -> each distinct encoder-cache producer among these plugins (the config's, and the
    one a scorer made when the config lists none), for the EPP's metrics."""
    out: dict[int, MMEmbeddingsCacheProducer] = {}
    for plugin in plugins:
        producer = plugin.producer if isinstance(plugin, MMEmbeddingsCacheScorer) else plugin
        if isinstance(producer, MMEmbeddingsCacheProducer):
            out.setdefault(id(producer.index), producer)
    return {p.name: p for p in out.values()}
