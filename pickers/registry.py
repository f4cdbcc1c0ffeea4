"""Plugin types by their config `type` name (SPEC section 4), each with a factory
`(name, parameters, ctx) -> plugin` that validates the parameters (ParameterError names the field).

The names a user writes in YAML are the `type` attributes of the classes listed here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from extproc.errors import ConfigError
from pickers.filters.by_label import ByLabelFilter, LabelSelectorFilter
from pickers.filters.role import DecodeFilter, PrefillFilter
from pickers.params import Params
from pickers.picker.max_score import MaxScorePicker
from pickers.picker.random import RandomPicker
from pickers.picker.round_robin import RoundRobinPicker
from pickers.picker.weighted_random import WeightedRandomPicker
from pickers.pd_decider import AlwaysDisaggPDDecider, PrefixBasedPDDecider
from pickers.profile_handler import (
    DisaggHeadersHandler,
    DisaggProfileHandler,
    PdProfileHandler,
    PrefillHeaderHandler,
    SingleProfileHandler,
)
from pickers.scorers.active_request import ActiveRequestScorer
from pickers.scorers.kv_cache import KVCacheUtilizationScorer
from pickers.scorers.load_aware import LoadAwareScorer
from pickers.scorers.lora_affinity import LoraAffinityScorer
from pickers.scorers.no_hit_lru import NoHitLRUScorer
from pickers.scorers.prefill_load import PrefillLoadScorer
from pickers.scorers.precise_prefix import PrecisePrefixCacheScorer
from pickers.scorers.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer
from pickers.scorers.queue import QueueScorer
from pickers.scorers.running_requests import RunningRequestsSizeScorer
from pickers.scorers.session_affinity import SessionAffinityScorer
from pickers.scorers.token_load import TokenLoadScorer
from pickers.types import PluginContext

Factory = Callable[[str, Mapping[str, Any] | None, PluginContext], object]


class _Configurable(Protocol):
    type: str

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> object: ...


_CLASSES: tuple[type[_Configurable], ...] = (
    # scorers
    QueueScorer,
    KVCacheUtilizationScorer,
    PrefixCacheScorer,
    PrecisePrefixCacheScorer,
    RunningRequestsSizeScorer,
    LoadAwareScorer,
    ActiveRequestScorer,
    TokenLoadScorer,
    LoraAffinityScorer,
    SessionAffinityScorer,
    NoHitLRUScorer,
    PrefillLoadScorer,  # llm-epp's: queued + own uncached prefill work
    # filters
    ByLabelFilter,
    LabelSelectorFilter,
    PrefillFilter,
    DecodeFilter,
    # pickers
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    RoundRobinPicker,  # llm-epp's baseline; not a reference-picker type
    # profile handlers
    SingleProfileHandler,
    DisaggProfileHandler,
    PdProfileHandler,  # llm-d's older name for the P/D handler
    # P/D deciders
    PrefixBasedPDDecider,
    AlwaysDisaggPDDecider,
    # llm-d plugins that load for compatibility and do nothing here (see their docstrings)
    DisaggHeadersHandler,
    PrefillHeaderHandler,
    ApproxPrefixCacheProducer,
)

# Types the reference pickers know that llm-epp refuses for now, with the reason.
NOT_YET: Mapping[str, str] = MappingProxyType({})


def _factory(cls: type[_Configurable]) -> Factory:
    def make(name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> object:
        p = Params(parameters)
        plugin = cls.from_config(name, p, ctx)
        p.done()
        return plugin

    return make


PLUGINS: Mapping[str, Factory] = MappingProxyType({cls.type: _factory(cls) for cls in _CLASSES})


def known_types() -> list[str]:
    return sorted(PLUGINS)


def create_plugin(type_name: str, name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> object:
    """Build one plugin. Raises ConfigError for an unknown type, ParameterError for a bad parameter."""
    factory = PLUGINS.get(type_name)
    if factory is None:
        if type_name in NOT_YET:
            raise ConfigError(f"plugin type {type_name!r}: {NOT_YET[type_name]}")
        raise ConfigError(f"unknown plugin type {type_name!r}; known types: {', '.join(known_types())}")
    return factory(name, parameters, ctx)
