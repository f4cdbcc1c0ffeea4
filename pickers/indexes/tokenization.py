"""Request tokenization for the precise prefix scorer: the token ids the model server will compute
KV blocks for, from the same tokenizer files, with the chat template applied to chat requests.

Two tokenizers: `HFTokenizer` reads a local Hugging Face tokenizer folder (`tokenizer.json`,
`tokenizer_config.json` with `chat_template`, or `chat_template.jinja`) with the `tokenizers`
library and renders chat templates with Jinja2 the way `transformers` does (sandboxed,
`trim_blocks`/`lstrip_blocks`, `raise_exception`, `tojson`), without importing `transformers`.
`SimTokenizer` is the simulator's fake 4-bytes-per-token one, defined here and imported by vllm_sim.

Only a bounded prefix is tokenized: the scorer never matches more than `max_tokens` tokens, so
a long prompt costs what its first `max_tokens` tokens cost (see `encode_prefix`). `RequestTokenizer`
turns one request (completions prompt, token ids, or chat messages) into its token ids, with a cache.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol

import xxhash

from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest

# Characters tokenized per wanted token at first; doubled until enough stable tokens come out.
_CHARS_PER_TOKEN_GUESS = 6
# Tokens whose text ends this close to a cut may differ from the whole text's: dropped.
_CUT_MARGIN_CHARS = 64


class Tokenizer(Protocol):
    cheap: bool  # True: run inline; False: the scorer may run it in a thread with a time budget

    def encode_prefix(self, text: str, max_tokens: int, *, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
                    tools: Any = None) -> str: ...


def message_text(content: Any) -> str:
    """A message's content as one string: text parts joined by newlines, as vLLM does for
    templates that expect string content."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")
        )
    return str(content)


class HFTokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"no tokenizer.json in {folder}", field="tokenizer")
        self.path = folder
        self._tok = RustTokenizer.from_file(str(tok_file))
        config: dict[str, Any] = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.chat_template: str | None = template
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._compiled: Any = None

    cheap = False  # real tokenization takes ~10 us per token here: worth a thread for long prompts

    def _encode(self, text: str, add_special_tokens: bool) -> Any:
        # encode_batch releases the GIL (encode does not), so a thread running it leaves the loop free
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._encode(text, add_special_tokens).ids)

    def encode_prefix(self, text: str, max_tokens: int, *, add_special_tokens: bool) -> list[int]:
        """The first `max_tokens` tokens of `text` (fewer if it is shorter), tokenizing only a
        prefix of it. A cut can change the tokens next to it, so tokens ending within a margin of
        the cut are dropped and the cut grows until enough stable tokens remain."""
        cut = max_tokens * _CHARS_PER_TOKEN_GUESS + _CUT_MARGIN_CHARS
        while True:
            if cut >= len(text):
                return self.encode(text, add_special_tokens=add_special_tokens)[:max_tokens]
            enc = self._encode(text[:cut], add_special_tokens)
            limit = cut - _CUT_MARGIN_CHARS
            stable = 0
            for i, (_, end) in enumerate(enc.offsets):
                if end > limit:
                    break
                stable = i + 1
            if stable >= max_tokens:
                return list(enc.ids[:max_tokens])
            cut *= 2

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool, tools: Any = None) -> str:
        if self.chat_template is None:
            raise ConfigError(f"the tokenizer in {self.path} has no chat template", field="tokenizer")
        if self._compiled is None:
            self._compiled = _jinja_env().from_string(self.chat_template)
        msgs = [{**m, "content": message_text(m.get("content"))} for m in messages]
        return str(self._compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **{k: v for k, v in self.special.items() if v is not None}))


# The simulator's tokenizer (vllm_sim imports it from here): one token per 4 bytes of UTF-8, so
# token counts look like a real BPE's and texts with a common prefix have a common token prefix.
SIM_BYTES_PER_TOKEN = 4
SIM_VOCAB_SIZE = 50000


def sim_encode(data: bytes) -> list[int]:
    step = SIM_BYTES_PER_TOKEN
    return [xxhash.xxh32_intdigest(data[i : i + step]) % SIM_VOCAB_SIZE for i in range(0, len(data), step)]


def sim_chat_template(messages: Iterable[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """Render (role, content) pairs; each message is a self-contained chunk, so shared leading
    messages give a shared text (and token) prefix."""
    text = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text


class SimTokenizer:
    """The simulator's tokenizer (`sim_encode`) and chat template (`sim_chat_template`)."""

    cheap = True  # a hash per 4 bytes: never worth a thread

    def encode_prefix(self, text: str, max_tokens: int, *, add_special_tokens: bool) -> list[int]:
        # Tokens are fixed 4-byte slices: the first N of a cut text are the first N of the whole.
        return sim_encode(text.encode("utf-8", "surrogatepass")[: max_tokens * SIM_BYTES_PER_TOKEN])

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool, tools: Any = None) -> str:
        return sim_chat_template(
            ((str(m.get("role", "")), message_text(m.get("content"))) for m in messages), add_generation_prompt
        )


def load_tokenizer(spec: str) -> Tokenizer:
    """`sim` for the simulator's tokenizer, else a local tokenizer folder (or its tokenizer.json)."""
    if spec == "sim":
        return SimTokenizer()
    return HFTokenizer(spec)


_TOKEN_CACHE = 1024  # prompts whose tokens are kept (a retried or repeated prompt is not re-tokenized)


class RequestTokenizer:
    """The request's token ids, as the engine will see them, at most `max_tokens` of them.

    Scoring is synchronous, on the event loop. A real tokenizer runs in a worker thread (it
    releases the GIL) and the pick waits for it at most `budget` seconds; a prompt not tokenized
    in time gets no precise score this once (the result is cached for its next request). With
    `budget` 0 it tokenizes inline (the token-producer calls it so from its own worker thread).
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


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _jinja_env() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
