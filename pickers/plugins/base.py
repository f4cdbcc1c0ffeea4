"""What every plugin shares: the context its factory gets, and a small base for name, type and
`from_config` (a plugin without parameters needs nothing more).

The registry (pickers.config.registry) builds a plugin as `cls.from_config(name, params, ctx)`, then
`params.done()` refuses any parameter the plugin did not read.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel


class TokenPoolFactory(Protocol):
    """Builds the token-producer of llm-d's legacy tokenization pool from its config section (`p`:
    indexerConfig.tokenizersPoolConfig), named `name` (pickers.plugins.producer.tokens.tokenizers_pool)."""

    def __call__(self, name: str, p: Params) -> TokenSource: ...


@dataclass(slots=True)
class PluginContext:
    """What plugins share, handed to every plugin factory: the approximate prefix index, one random
    source, the latency model request control feeds, and what builds a legacy tokenization pool."""

    prefix_index: ApproxPrefixIndex = field(default_factory=ApproxPrefixIndex)
    rng: random.Random = field(default_factory=random.Random)
    max_endpoints: int = 1  # pickers' maxNumOfEndpoints when the config leaves it out (--max-num-endpoints)
    latency: LatencyModel = field(default_factory=LatencyModel)
    # for the old precise-prefix-cache-scorer's tokenizersPoolConfig: the registry sets it on first use
    # (the scorers' folder cannot import the token-producer's, which imports it)
    tokenizers_pool: TokenPoolFactory | None = None


class Plugin:
    """A plugin's identity: `type` is its config type name, `name` its instance name (the type by default)."""

    type: ClassVar[str]

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.type

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> Plugin:
        """Build from the config's `parameters`; plugins with parameters read them from `p` here."""
        return cls(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@runtime_checkable
class PrefixMatchSource(Protocol):
    """A prefix producer's match, as llm-d's PrefixCacheMatchInfo: per endpoint address, (blocks
    matched, blocks in the prompt, tokens a block), computed once per cycle."""

    name: str

    def prefix_matches(self, request: Any, cycle: Any, endpoints: Sequence[Any]) -> dict[str, tuple[int, int, int]]: ...


@runtime_checkable
class TokenSource(Protocol):
    """A plugin that sets `InferenceRequest.prompt_token_ids` before scheduling (the token-producer), as the
    plugins that match tokens find it: `token_backend` is "estimate" (no ids), "vllm", "uds" or "local"."""

    name: str
    token_backend: str


@runtime_checkable
class ImpliesProducers(Protocol):
    """A plugin that brings data producers of its own, which the config runs after its own (the old
    precise-prefix-cache-scorer's tokenizersPoolConfig: a token-producer asked after the config's)."""

    def implied_producers(self) -> tuple[object, ...]: ...


def configured_plugin(plugins: Mapping[str, object], name: str | None, cls: type[Any], param: str) -> Any:
    """The `cls` plugin a reference parameter `param` names, else the config's one named like its type or
    its only one, else None (the caller makes one with llm-d's defaults, as llm-d does). A name that is
    not such a plugin, or several candidates with none named, raise ParameterError on `param`."""
    if name is not None:
        found = plugins.get(name)
        if not isinstance(found, cls):
            article = "an" if cls.type[0] in "aeiou" else "a"
            what = "no plugin" if found is None else f"{getattr(found, 'type', '?')}, not {article} {cls.type}"
            raise ParameterError(param, f"{shown(name)}: {what}")
        return found
    candidates = {n: q for n, q in plugins.items() if isinstance(q, cls)}
    if cls.type in candidates:
        return candidates[cls.type]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if candidates:
        raise ParameterError(param, f"{len(candidates)} {cls.type} plugins ({', '.join(candidates)}); name the one this plugin reads")
    return None
