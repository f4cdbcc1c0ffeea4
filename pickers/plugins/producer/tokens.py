"""token-producer (llm-d; its old name `tokenizer` loads with llm-d's deprecation warning): the prompt's
token ids, set on the request (`InferenceRequest.prompt_token_ids`) before scheduling. What counts tokens
then counts them (the P/D decider's `nonCachedTokens`, the in-flight token load, prefill work) and
precise-prefix-cache-producer matches them against the engines' KV blocks.

One backend per config, chosen as llm-d chooses it:
- `estimate` (the default, also `estimate: {}`): no tokenizer, no ids; counts stay the 4-characters-
  a-token estimate, an image, video or audio part counting its placeholder tokens instead of its text
  (`estimate.image`, `estimate.video`: pickers.plugins.producer.media).
- `vllm` (or `modelName` alone): the model server's own tokenization, from vLLM's render endpoints
  (POST {url}/v1/completions/render, /v1/chat/completions/render; `vllm serve` and the GPU-less
  `vllm launch render` serve them), with the body as the client sent it and `model: modelName`.
  The call is the EPP's (extproc.requestcontrol.render attaches it as `renderer`); it is awaited
  before the pick, at most `vllm.timeout` (5s; `vllm.mmTimeout`, 30s, when a message has content
  parts), and a request whose call fails or times out is scheduled on the estimate. A chat's answer
  also names its multimodal items (`features.mm_hashes`, kept as `InferenceRequest.media_hashes` for
  the mm-embeddings-cache-producer).
- `udsTokenizerConfig` (deprecated in llm-d; loads with its deprecation warning; `modelName`
  required): llm-d's tokenizer sidecar (vLLM's renderer on CPU) over gRPC on a Unix domain socket
  (`socketFile`; `useTCP: true` makes it a host:port, for tests), asked for `modelName` or its
  `modelTokenizerMap` entry. The client is the EPP's (extproc.requestcontrol.uds_tokenizer); calls
  are awaited as the vllm backend's, at most 5s (30s for content parts: llm-d's fixed timeouts).
- `local` (llm-epp's): `local.tokenizer` is a tokenizer folder (tokenizer.json, the chat template)
  or `sim` (the simulator's); tokenized in a worker thread, awaited at most `local.timeout` (5s).

Prompts that are token ids already (completions) are taken as they are, whatever the backend.
Failures are counted by reason in `fallbacks` (a metric) and logged once per reason.

llm-d's deprecated tokenization pool (`tokenizers_pool`: llm-d-kv-cache's tokenization.Config, the old
precise-prefix-cache-scorer's `indexerConfig.tokenizersPoolConfig`) is this plugin's uds backend too:
the scorer owns one, asked after the config's own token-producers, and it tokenizes only a request
they gave no ids, as llm-d's legacy pool only tokenizes a request that has none. `workersCount` bounds
its calls in flight; it waits at most llm-d's 400 ms data-producer budget.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.tokenization import RequestTokenizer, Tokenizer, load_tokenizer
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.producer.media import MediaEstimate, media_estimate

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = "5s"
DEFAULT_MM_TIMEOUT = "30s"
# llm-d-kv-cache's UDS client: fixed, not configurable (5s; 30s when a message has content parts)
UDS_TIMEOUT = 5.0
UDS_MM_TIMEOUT = 30.0
UDS_DEPRECATION = ("DEPRECATION: the 'udsTokenizerConfig' parameter is deprecated and will be removed in a future "
                   "release; set the 'vllm' parameter instead")  # llm-d's words  # fmt: skip
# llm-d's legacy tokenization pool (tokenizersPoolConfig)
POOL_WORKERS = 5  # llm-d-kv-cache's defaultWorkers: its DefaultConfig, what the guides were written against
# llm-d's director gives a data producer 400 ms unless it names a timeout of its own (dataProducerTimeout);
# the legacy scorer names none, so its pool's tokens come within 400 ms or not at all (text or multimodal)
POOL_TIMEOUT = 0.4
_RENDERED_APIS = frozenset({"completions", "chat"})  # the APIs vLLM's render endpoints (and the sidecar's) take
_REMOTE = frozenset({"vllm", "uds"})  # the backends whose tokens the EPP's client (`renderer`) fetches
_LOCAL_APIS = frozenset({"completions", "chat", "messages"})  # and what a local tokenizer renders itself


@dataclass(slots=True, frozen=True)
class Rendered:
    """The model server's tokenization of one request: its token ids and, for a chat, its multimodal
    items' hashes by modality (vLLM's `features.mm_hashes`; {} when it found none, None when unknown)."""

    token_ids: list[int]
    media_hashes: dict[str, list[str]] | None = None


@dataclass(slots=True, frozen=True)
class UdsTokenizerTarget:
    """udsTokenizerConfig: where llm-d's tokenizer sidecar listens, and the model it is asked for."""

    socket_file: str
    use_tcp: bool  # socket_file is host:port (llm-d: for tests only)
    model: str  # modelName, or its modelTokenizerMap entry (a tokenizer.json's folder)

    @property
    def grpc_target(self) -> str:
        return self.socket_file if self.use_tcp else f"unix:{self.socket_file}"


class Renderer(Protocol):
    """The model server's tokenization of one request (the EPP's client: HTTP for vllm, gRPC for uds)."""

    async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered: ...


class TokenProducer(Plugin):
    type = "token-producer"

    def __init__(
        self,
        name: str = "token-producer",
        *,
        backend: str = "estimate",
        model_name: str = "",
        url: str = DEFAULT_URL,
        timeout: float = 5.0,
        mm_timeout: float = 30.0,
        tokenizer: Tokenizer | None = None,
        media: MediaEstimate | None = None,
        uds: UdsTokenizerTarget | None = None,
        concurrency: int = 0,
    ) -> None:
        self.name = name
        self.token_backend = backend  # "estimate", "vllm", "uds" or "local" (pickers.plugins.base.TokenSource)
        self.model_name = model_name
        self.url = url.rstrip("/")
        self.uds = uds
        # the model the backend is asked to tokenize for: modelName, or the sidecar's modelTokenizerMap entry
        self.render_model = uds.model if uds is not None else model_name
        self.timeout = timeout
        self.mm_timeout = mm_timeout
        self.renderer: Renderer | None = None  # the EPP's client, for the vllm and uds backends
        # at most this many backend calls in flight, the others queue within their timeout (0: no bound;
        # the legacy pool's workersCount, llm-d's tokenization workers)
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        self._local = RequestTokenizer(tokenizer, 0.0) if tokenizer is not None else None
        self._cheap = tokenizer is not None and tokenizer.cheap
        self._pool: ThreadPoolExecutor | None = None
        self.fallbacks: Counter[str] = Counter()  # requests scheduled on the estimate, by reason
        self._apis = _LOCAL_APIS if tokenizer is not None else _RENDERED_APIS
        # the estimate's placeholder tokens for images and videos (llm-d's estimate backend only)
        self.media = media if media is not None else (MediaEstimate() if backend == "estimate" else None)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TokenProducer:
        model = p.string("modelName", "") or ""
        media = media_estimate(p.section("estimate"))
        uds = _uds_settings(p, _UDS)
        vllm = p.section("vllm")
        url = vllm.string("url", DEFAULT_URL) or DEFAULT_URL
        timeout = vllm.duration_or("timeout", DEFAULT_TIMEOUT)
        mm_timeout = vllm.duration_or("mmTimeout", DEFAULT_MM_TIMEOUT)
        local = p.section("local")
        spec = local.string("tokenizer")
        local_timeout = local.duration_or("timeout", DEFAULT_TIMEOUT)
        # modelName alone selects vllm; with udsTokenizerConfig it names the sidecar's model (llm-d 0.10's
        # own check counts it for vllm there too, and so refuses every UDS config: docs/configuration.md)
        given_uds = p.given(_UDS)
        chosen = [k for k, on in (("estimate", p.given("estimate")), ("vllm", p.given("vllm") or (bool(model) and not given_uds)),
                                  (_UDS, given_uds), ("local", p.given("local"))) if on]  # fmt: skip
        if len(chosen) > 1:
            raise ParameterError(chosen[1], f"only one of estimate, vllm (or modelName), {_UDS} and local may be set, "
                                            f"got {', '.join(chosen)}")  # fmt: skip
        backend = chosen[0] if chosen else "estimate"
        for section in ("estimate", "vllm", _UDS, "local"):  # show the backend that runs, with its settings
            if section != backend:
                del p.effective[section]
        if backend not in ("vllm", _UDS):
            del p.effective["modelName"]
        if backend == _UDS:
            p.warnings.append(UDS_DEPRECATION)
            if not model:
                raise ParameterError("modelName", f"is required with {_UDS}: the model whose tokenizer the sidecar loads")
            return cls(name, backend="uds", model_name=model, uds=uds(model), timeout=UDS_TIMEOUT, mm_timeout=UDS_MM_TIMEOUT)
        if backend == "vllm":
            if not model:
                raise ParameterError("modelName", "is required with vllm: the model whose tokenizer the render endpoint uses")
            if not url.startswith("http://"):
                raise ParameterError("vllm.url", f"expected an http:// URL (TLS is not supported, as in llm-d), got {shown(url)}")
            if timeout <= 0 or mm_timeout <= 0:
                raise ParameterError("vllm.timeout", "timeouts must be positive: the pick waits at most this long for the tokens")
            return cls(name, backend="vllm", model_name=model, url=url, timeout=timeout, mm_timeout=mm_timeout)
        if backend == "local":
            if not spec:
                raise ParameterError("local.tokenizer", "is required: a tokenizer folder (tokenizer.json) or sim")
            if local_timeout <= 0:
                raise ParameterError("local.timeout", "must be positive: the pick waits at most this long for the tokens")
            try:
                tokenizer = load_tokenizer(spec)
            except Exception as e:  # noqa: BLE001 - a missing folder, a broken tokenizer.json: the user's to fix
                raise ParameterError("local.tokenizer", f"cannot load a tokenizer from {spec!r}: {e}") from None
            return cls(name, backend="local", tokenizer=tokenizer, timeout=local_timeout, mm_timeout=local_timeout)
        return cls(name, media=media)

    # -- the request path ----------------------------------------------------------------------
    def needs_io(self, request: InferenceRequest) -> bool:
        """Whether this request's tokens are awaited (`prepare`) before the pick: a network call or
        a real tokenizer's thread. The estimate and the simulator's tokenizer cost nothing to wait for."""
        if request.prompt_token_ids is not None or request.api not in self._apis:
            return False
        if self.token_backend in _REMOTE:
            return self.renderer is not None
        return self.token_backend == "local" and not self._cheap

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Before each cycle: token ids given in the prompt, or the simulator's tokenizer, inline; the
        estimate's placeholder tokens for the prompt's media parts."""
        if request.prompt_token_ids is not None:
            return
        if request.media and self.media is not None and request.media_tokens is None:
            request.media_tokens = self.media.tokens(request.media, request.headers)
        if request.api not in self._apis:
            return
        given = pretokenized(request.body)
        if given is not None:
            request.prompt_token_ids = given
        elif self._cheap and self._local is not None:
            request.prompt_token_ids = list(self._local.tokens(request, sys.maxsize))

    async def prepare(self, request: InferenceRequest) -> None:
        """Set the request's token ids from the backend, waiting at most the timeout; on a failure
        the request goes on with the estimate (counted in `fallbacks`, logged once per reason)."""
        if request.prompt_token_ids is not None:
            return
        given = pretokenized(request.body)
        if given is not None:
            request.prompt_token_ids = given
            return
        timeout = self.mm_timeout if _has_content_parts(request.body) else self.timeout
        try:
            if self.token_backend in _REMOTE and self.renderer is not None:
                rendered = await asyncio.wait_for(self._render(self.renderer, request, timeout), timeout)
                ids = rendered.token_ids
                if rendered.media_hashes is not None:
                    request.media_hashes = rendered.media_hashes
            elif self._local is not None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{self.name}")
                local = self._local
                future = asyncio.get_running_loop().run_in_executor(self._pool, local.tokens, request, sys.maxsize)
                ids = list(await asyncio.wait_for(future, timeout))
            else:
                return
        except TimeoutError:
            self._fallback("timeout", f"no tokens within {timeout:g}s")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the backend costs the estimate, not the request
            self._fallback(type(e).__name__, str(e) or type(e).__name__)
            return
        request.prompt_token_ids = ids

    async def _render(self, renderer: Renderer, request: InferenceRequest, timeout: float) -> Rendered:
        if self._slots is None:
            return await renderer.render(request, self.render_model, timeout)
        async with self._slots:  # a free worker first (the wait counts in the timeout, as in llm-d's queue)
            return await renderer.render(request, self.render_model, timeout)

    def _fallback(self, reason: str, detail: str) -> None:
        first = reason not in self.fallbacks
        self.fallbacks[reason] += 1
        if first:
            where = f" from {self.url}" if self.token_backend == "vllm" else ""
            if self.uds is not None:
                where = f" from the tokenizer sidecar at {self.uds.grpc_target}"
            log.warning("%s %s: %s%s; requests are scheduled on the estimated token count meanwhile "
                        "(counted in llm_epp_token_producer_fallbacks_total, logged once per reason)",
                        self.type, self.name, detail, where)  # fmt: skip

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class LegacyTokenizer(TokenProducer):
    """llm-d's old name of token-producer: the same plugin, with llm-d's deprecation warning."""

    type = "tokenizer"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TokenProducer:
        p.warnings.append(f"plugin type {cls.type} is deprecated: use {TokenProducer.type} (the same parameters)")
        return super().from_config(name, p, ctx)


_UDS = "udsTokenizerConfig"


def _uds_settings(p: Params, key: str) -> Callable[[str], UdsTokenizerTarget]:
    """`key`'s fields, llm-d-kv-cache's UdsTokenizerConfig (socketFile, useTCP, modelTokenizerMap): the
    token-producer's udsTokenizerConfig and the legacy pool's uds. Read now; checked, for a modelName, by
    the target it gives once the backend is chosen."""
    uds = p.section(key)
    socket_file = uds.string("socketFile", "") or ""
    use_tcp = uds.flag("useTCP", False)
    mapped = uds.given("modelTokenizerMap")
    tokenizer_map = uds.string_map("modelTokenizerMap")
    if not mapped:
        del uds.effective["modelTokenizerMap"]
    fixed = "llm-d's UDS client has no such setting (timeouts 5s, 30s with content parts, and no retries) and refuses it"
    uds.refused("timeout", fixed)
    uds.refused("maxRetries", fixed)

    def target(model: str) -> UdsTokenizerTarget:
        if not socket_file:
            llmd = f"llm-d ignores a {key} without one" if key == _UDS else "llm-d refuses a pool without one"
            raise ParameterError(uds.path("socketFile"), f"is required: the tokenizer sidecar's socket, e.g. /tmp/tokenizer/tokenizer-uds.socket ({llmd})")
        if use_tcp:
            host, _, port = socket_file.rpartition(":")
            if not host or not port.isdigit():
                raise ParameterError(uds.path("socketFile"), f"with useTCP: true, expected host:port, got {shown(socket_file)}")
        sent = model
        if mapped:  # as llm-d-kv-cache: the model's entry, a folder or a tokenizer.json (then its folder)
            if model not in tokenizer_map:
                known = ", ".join(sorted(tokenizer_map)) or "nothing"
                raise ParameterError(uds.path("modelTokenizerMap"), f"has no entry for modelName {shown(model)}; it maps {known}")
            path = PurePosixPath(tokenizer_map[model])
            sent = str(path.parent) if path.name == "tokenizer.json" else str(path)
        return UdsTokenizerTarget(socket_file, use_tcp, sent)

    return target


def tokenizers_pool(name: str, p: Params) -> TokenProducer:
    """llm-d's deprecated tokenization pool, read from its config `p` (llm-d-kv-cache's tokenization.Config:
    the old precise-prefix-cache-scorer's `indexerConfig.tokenizersPoolConfig`), as the token-producer it
    implies: the uds backend, for `modelName`, at most `workersCount` calls in flight (llm-d's worker
    goroutines; 0 or left out: llm-d-kv-cache's default, 5), within llm-d's 400 ms budget."""
    where = p.prefix.rstrip(".")
    model = p.string("modelName", "") or ""
    workers = p.integer("workersCount", 0, minimum=0) or POOL_WORKERS
    p.effective["workersCount"] = workers
    uds = _uds_settings(p, "uds")
    gone = ("tokenizer was removed with llm-d-kv-cache's embedded tokenizers (0.8) and llm-d 0.10 refuses the field; null "
            "(off, as the guides write it) loads. Tokenize with the sidecar (uds) or a token-producer")  # fmt: skip
    p.refused("hf", f"the pool's HuggingFace (download) {gone} (vllm)")
    p.refused("local", f"the pool's local-files {gone} (local.tokenizer: a tokenizer folder)")
    if not model:
        raise ParameterError(p.path("modelName"), "is required: the model whose tokenizer the sidecar loads (as llm-d)")
    if not p.given("uds"):
        raise ParameterError(p.path("uds"), "is required: the tokenizer sidecar's socket (uds: {socketFile: ...}); llm-d's pool "
                                            "has no other tokenizer")  # fmt: skip
    p.warnings.append(f"{where} is deprecated in llm-d (its legacy tokenization pool): configure a {TokenProducer.type} (vllm, "
                      f"or {_UDS} for the same sidecar) instead; meanwhile it tokenizes what no {TokenProducer.type} did")  # fmt: skip
    return TokenProducer(name, backend="uds", model_name=model, uds=uds(model), timeout=POOL_TIMEOUT, mm_timeout=POOL_TIMEOUT,
                         concurrency=workers)  # fmt: skip


def pretokenized(body: Mapping[str, Any]) -> list[int] | None:
    """A completions prompt given as token ids (one list, or a batch of lists: all their ids)."""
    prompt = body.get("prompt") if body else None
    if not isinstance(prompt, list) or not prompt:
        return None
    first = prompt[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return [t for t in prompt if isinstance(t, int)]
    if isinstance(first, list):
        return [t for p in prompt if isinstance(p, list) for t in p if isinstance(t, int)]
    return None


def _has_content_parts(body: Mapping[str, Any]) -> bool:
    """A chat message with content parts (images, audio) takes the multimodal timeout, as in llm-d."""
    messages = body.get("messages") if body else None
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) and m["content"] for m in messages)
