"""The encoder-cache index (llm-d's mm-embeddings-cache-producer keeps one): which endpoint probably
holds the encoder output (embeddings) of which multimodal item, learned from where items were routed.

An item is one image, video or audio input of a request, named by a content hash: the model server's
own (vLLM's `mm_hashes`, from its render endpoint or a generate body's `features`) when the request
carries them, else a hash of the part as the client sent it (`media_items`). Each endpoint keeps an
LRU of the items routed to it, bounded in entries, so memory is bounded by endpoints x capacity. A
lookup costs O(items + the endpoints holding them), nothing per endpoint that holds none of them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import xxhash

from pickers.framework.histogram import Histogram
from pickers.framework.request import InferenceRequest, MediaPart
from pickers.indexes.prefix import HIT_RATIO_BUCKETS

DEFAULT_MEDIA_TYPE = "image/jpeg"  # an inline image without one is hashed as this data URL (llm-d's default)


@dataclass(slots=True, frozen=True)
class MediaItem:
    key: str  # the item's content hash
    modality: str  # image, video or audio
    size: int = 1  # its weight in the score: every item weighs 1, as in llm-d


@dataclass(slots=True, frozen=True)
class EncoderCacheMatch:
    """A request's unique items and, per endpoint address, the size of those it probably holds."""

    items: tuple[MediaItem, ...]
    total: int
    matched: dict[str, int]


NO_MATCH = EncoderCacheMatch((), 0, {})


def part_key(part: MediaPart) -> str | None:
    """The content hash of a media part as the client sent it, as llm-d's estimate hashes it: an image's
    or video's URL (a data: URL is its content), an inline (Anthropic base64) image as its data URL, an
    `input_audio` part's data then format, an `audio_url` part's URL. None when nothing identifies it."""
    if not part.source:
        return None
    h = xxhash.xxh3_64()
    if part.kind == "audio":
        h.update(_utf8(part.source))
        h.update(_utf8(part.media_type))
    elif part.inline:
        h.update(b"data:")
        h.update(_utf8(part.media_type or DEFAULT_MEDIA_TYPE))
        h.update(b";base64,")
        h.update(_utf8(part.source))
    else:
        h.update(_utf8(part.source))
    return h.hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates


def media_items(request: InferenceRequest) -> tuple[MediaItem, ...]:
    """The request's unique items, in prompt order: the server's hashes when the request has them (even
    none: the server found no media), else its media parts' hashes. An item repeated counts once."""
    seen: dict[str, MediaItem] = {}
    if request.media_hashes is not None:
        for modality, hashes in request.media_hashes.items():
            for key in hashes:
                if key and key not in seen:
                    seen[key] = MediaItem(key, modality)
    elif request.media:
        for part in request.media:
            key = part_key(part)
            if key is not None and key not in seen:
                seen[key] = MediaItem(key, part.kind)
    return tuple(seen.values())


@dataclass(slots=True)
class EncoderCacheStats:
    """What llm-d's encoder-cache metrics count: lookups per modality, hits per (endpoint, modality),
    and per lookup and endpoint the share of the request's items it holds."""

    queries: Counter[str] = field(default_factory=Counter)
    hits: Counter[tuple[str, str]] = field(default_factory=Counter)
    hit_ratio: Histogram = field(default_factory=lambda: Histogram(HIT_RATIO_BUCKETS))


class EncoderCacheIndex:
    """item key -> endpoints that hold it, plus one LRU of keys per endpoint of at most `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._holders: dict[str, set[str]] = {}
        self._lru: dict[str, OrderedDict[str, None]] = {}
        self.stats = EncoderCacheStats()

    def match(self, items: tuple[MediaItem, ...]) -> EncoderCacheMatch:
        """Who holds which of these items; counted in `stats` (a lookup per item, a hit per holder).
        Reading does not refresh an item's place in an LRU: only routing it there does."""
        if not items:
            return NO_MATCH
        matched: dict[str, int] = {}
        stats = self.stats
        get = self._holders.get
        for item in items:
            stats.queries[item.modality] += 1
            holders = get(item.key)
            if holders:
                for address in holders:
                    matched[address] = matched.get(address, 0) + item.size
                    stats.hits[(address, item.modality)] += 1
        return EncoderCacheMatch(items, sum(i.size for i in items), matched)

    def observe(self, match: EncoderCacheMatch, addresses: AbstractSet[str]) -> None:
        """Each candidate's hit ratio for this lookup (llm-d observes one per endpoint scored), in
        O(endpoints holding an item): the others observe 0 all at once."""
        if not match.total:
            return
        h, total = self.stats.hit_ratio, match.total
        warm = 0
        for address, held in match.matched.items():
            if address in addresses:
                h.observe(held / total)
                warm += 1
        h.observe_many(0.0, len(addresses) - warm)

    def record(self, address: str, keys: Iterable[str]) -> None:
        """The endpoint now holds these items, the last the most recent; a full LRU drops its oldest."""
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = OrderedDict()
        holders = self._holders
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
                continue
            lru[key] = None
            s = holders.get(key)
            if s is None:
                holders[key] = {address}
            else:
                s.add(address)
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            self._drop(old, address)

    def remove_endpoint(self, address: str) -> None:
        """The endpoint left the pool: its entries and its hit counts go with it."""
        lru = self._lru.pop(address, None)
        if lru:
            for key in lru:
                self._drop(key, address)
        hits = self.stats.hits
        for k in [k for k in hits if k[0] == address]:
            del hits[k]

    def _drop(self, key: str, address: str) -> None:
        s = self._holders.get(key)
        if s is not None:
            s.discard(address)
            if not s:
                del self._holders[key]

    def holds(self, address: str, key: str) -> bool:
        lru = self._lru.get(address)
        return lru is not None and key in lru

    def items_of(self, address: str) -> int:
        lru = self._lru.get(address)
        return len(lru) if lru else 0

    def size(self) -> int:
        """(endpoint, item) entries held: at most endpoints x capacity."""
        return sum(len(lru) for lru in self._lru.values())
