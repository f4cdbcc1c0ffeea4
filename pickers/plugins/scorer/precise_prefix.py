"""precise-prefix-cache-scorer: the share of the prompt's leading KV blocks each endpoint really
holds, from the KV events its engine publishes (not from past routing, like prefix-cache-scorer).

The request is tokenized with the model's tokenizer (chat template for chat requests), cut into
the engine's blocks (its block size comes from its events), keyed like `pickers.indexes.kv_blocks`, and
matched against the index the plugin owns. The EPP (extproc.server.runner) feeds that index: with `subscribe`
on, it starts a KV-event subscriber for the plugin and attaches it as `subscriber`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import xxhash

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.kv_blocks import DEFAULT_CAPACITY, KVBlockIndex, request_keys
from pickers.indexes.tokenization import Tokenizer, load_tokenizer
from pickers.plugins.base import Plugin, PluginContext

DEFAULT_BLOCK_SIZE = 16  # until an endpoint's events tell its real block size
MAX_BLOCKS = 256
_TOKEN_CACHE = 1024  # prompts whose tokens are kept (a retried or repeated prompt is not re-tokenized)


class PreciseTokenizer:
    """The request's token ids, as the engine will see them, at most `max_tokens` of them.

    Scoring is synchronous, on the event loop. A real tokenizer runs in a worker thread (it
    releases the GIL) and the pick waits for it at most `budget` seconds; a prompt not tokenized
    in time gets no precise score this once (the result is cached for its next request).
    """

    def __init__(self, tokenizer: Tokenizer, budget: float = 0.05) -> None:
        self.tokenizer = tokenizer
        self.budget = budget
        self._cache: OrderedDict[tuple[str, int, int], list[int]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[tuple[str, int, int], Future[list[int]]] = {}
        self.last_seconds = 0.0  # time the last tokenization took (for tests and logs)
        self.over_budget = 0  # prompts not tokenized within the budget

    def tokens(self, request: InferenceRequest, max_tokens: int) -> list[int]:
        if request.prompt_token_ids is not None:  # the client tokenized it (vLLM's and SGLang's generate)
            return list(request.prompt_token_ids[:max_tokens])
        body: Mapping[str, Any] = request.body or {}
        if request.api == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt:
                first = prompt[0]
                if isinstance(first, int):
                    return [t for t in prompt if isinstance(t, int)][:max_tokens]
                if isinstance(first, list):
                    return [t for t in first if isinstance(t, int)][:max_tokens]
                prompt = first
            if not isinstance(prompt, str):
                return []
            return self._encode(prompt, max_tokens, add_special_tokens=True)
        if request.api == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                return []
            text = self.tokenizer.render_chat(
                [m for m in messages if isinstance(m, dict)],
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                tools=body.get("tools"),
            )
            return self._encode(text, max_tokens, add_special_tokens=False)
        if request.api == "messages":  # Anthropic's: vLLM renders it as a chat, its system prompt first
            messages = body.get("messages")
            if not isinstance(messages, list):
                return []
            chat = [m for m in messages if isinstance(m, dict)]
            system = body.get("system")
            if system:
                chat.insert(0, {"role": "system", "content": system})
            text = self.tokenizer.render_chat(chat, add_generation_prompt=True)
            return self._encode(text, max_tokens, add_special_tokens=False)
        return self._encode(request.prompt_text, max_tokens, add_special_tokens=True)

    def _encode(self, text: str, max_tokens: int, *, add_special_tokens: bool) -> list[int]:
        key = (xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass")), max_tokens, int(add_special_tokens))
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        if self.tokenizer.cheap or self.budget <= 0:
            return self._store(key, self._timed(text, max_tokens, add_special_tokens))
        future = self._running.get(key)
        if future is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
            future = self._pool.submit(self._timed, text, max_tokens, add_special_tokens)
            self._running[key] = future
            future.add_done_callback(lambda f: self._finished(key, f))
        try:
            return self._store(key, future.result(timeout=self.budget))
        except FutureTimeout:
            self.over_budget += 1
            return []

    def _timed(self, text: str, max_tokens: int, add_special_tokens: bool) -> list[int]:
        started = time.perf_counter()
        ids = self.tokenizer.encode_prefix(text, max_tokens, add_special_tokens=add_special_tokens)
        self.last_seconds = time.perf_counter() - started
        return ids

    def _finished(self, key: tuple[str, int, int], future: Future[list[int]]) -> None:
        # worker thread: only dict operations, which the GIL keeps whole
        self._running.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self._store(key, future.result())

    def _store(self, key: tuple[str, int, int], ids: list[int]) -> list[int]:
        self._cache[key] = ids
        self._cache.move_to_end(key)
        while len(self._cache) > _TOKEN_CACHE:
            try:
                self._cache.popitem(last=False)
            except KeyError:  # the other thread emptied it meanwhile
                break
        return ids


class PrecisePrefixCacheScorer(Plugin):
    type = "precise-prefix-cache-scorer"
    category = "affinity"

    def __init__(
        self,
        tokenizer: Tokenizer,
        name: str = "precise-prefix-cache-scorer",
        *,
        index: KVBlockIndex | None = None,
        tokenize_budget: float = 0.05,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = MAX_BLOCKS,
        subscribe: bool = True,
        kv_events_port: int = 5557,
    ) -> None:
        self.name = name
        self.index = index if index is not None else KVBlockIndex()
        self.tokenize = PreciseTokenizer(tokenizer, tokenize_budget)
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.subscribe = subscribe  # the EPP starts a KV-event subscriber for this index
        self.kv_events_port = kv_events_port  # 0: only endpoints that name theirs in a label
        self.subscriber: Any = None  # the EPP's extproc.datalayer.kv_events.KVEventSubscriber, once started

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrecisePrefixCacheScorer:
        spec = p.string("tokenizer", required=True)
        assert spec is not None
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as e:  # a missing folder, a broken tokenizer.json
            raise ParameterError("tokenizer", f"cannot load a tokenizer from {spec!r}: {e}") from None
        index = KVBlockIndex(p.integer("capacityPerEndpoint", DEFAULT_CAPACITY, minimum=1))
        port = p.integer("kvEventsPort", 5557, minimum=0)  # 0: only endpoints with the port label
        subscribe = p.flag("subscribe", True)
        return cls(
            tokenizer, name, index=index,
            tokenize_budget=p.number("tokenizeBudgetMs", 50.0, minimum=0.0) / 1000.0,
            block_size=p.integer("blockSize", DEFAULT_BLOCK_SIZE, minimum=1),
            max_blocks=p.integer("maxPrefixBlocksToMatch", MAX_BLOCKS, minimum=1),
            subscribe=subscribe, kv_events_port=port,
        )  # fmt: skip

    def matches(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int]]:
        """address -> (leading blocks held, blocks in the prompt), computed once per cycle."""
        key = f"precise-prefix/{self.name}"
        found = cycle.data.get(key)
        if isinstance(found, dict):
            return found
        sizes = {ep.address: self.index.block_size_of(ep.address) or self.block_size for ep in endpoints}
        max_tokens = max(sizes.values(), default=self.block_size) * self.max_blocks
        tokens = self.tokenize.tokens(request, max_tokens)
        lora = request.model if request.model in self.index.lora_names else None
        by_size: dict[int, tuple[list[int], dict[str, int]]] = {}
        out: dict[str, tuple[int, int]] = {}
        for address, size in sizes.items():
            if size not in by_size:
                keys = request_keys(tokens, size, self.max_blocks, lora)
                by_size[size] = (keys, self.index.match(keys))
            keys, matched = by_size[size]
            out[address] = (matched.get(address, 0), len(keys))
        cycle.data[key] = out
        return out

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        m = self.matches(request, cycle, endpoints)
        return [(held / total if total else 0.0) for held, total in (m[ep.address] for ep in endpoints)]


def precise_scorers(profiles: Iterable[Any]) -> dict[str, Any]:
    """plugin name -> each distinct precise-prefix-cache-scorer of these scheduling profiles, for the
    EPP to feed and for the metrics and the admin views."""
    out: dict[str, Any] = {}
    for prof in profiles:
        for plugin in prof.plugins():
            if getattr(plugin, "type", "") == PrecisePrefixCacheScorer.type and isinstance(getattr(plugin, "index", None), KVBlockIndex):
                out.setdefault(str(plugin.name), plugin)
    return out
