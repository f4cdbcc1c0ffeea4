"""Plugin types by their config `type` name (docs/configuration.md lists them), each with a factory
`(name, parameters, ctx) -> plugin` that validates the parameters (ParameterError names the field).

The names a user writes in YAML are the `type` attributes of the classes listed here. `build_plugin`
also returns the parameters the plugin runs with (defaults filled in) and any deprecation warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from pickers.config.unsupported import UNSUPPORTED_TYPES
from pickers.framework.errors import ConfigError, shown
from pickers.framework.params import Params
from pickers.plugins.admission.content_check import ContentCheckAdmitter
from pickers.plugins.admission.request_limits import RequestLimitsAdmitter
from pickers.plugins.base import PluginContext
from pickers.plugins.datalayer.discovery import FileDiscovery, MulticlusterFileDiscovery
from pickers.plugins.datalayer.extractors import (
    CoreMetricsExtractor,
    DcgmExtractor,
    ModelsDataExtractor,
    MulticlusterMetricsExtractor,
)
from pickers.plugins.datalayer.topology import TopologyExtractor
from pickers.plugins.datalayer.sources import (
    DcgmDataSource,
    EndpointNotificationSource,
    K8sNotificationSource,
    MetricsDataSource,
    ModelsDataSource,
    MulticlusterMetricsDataSource,
)
from pickers.plugins.filter.by_label import ByLabelFilter, ByLabelSelectorFilter, LabelSelectorFilter
from pickers.plugins.filter.context_length import ContextLengthAware
from pickers.plugins.filter.endpoint_attribute import EndpointAttributeFilter
from pickers.plugins.filter.prefix_affinity import PrefixCacheAffinityFilter
from pickers.plugins.filter.role import DecodeFilter, EncodeFilter, PrefillFilter
from pickers.plugins.filter.served_model import ServedModelFilter
from pickers.plugins.filter.utilization import UtilizationFilter
from pickers.plugins.flowcontrol.admitter import ProbabilisticAdmitter
from pickers.plugins.flowcontrol.agent_identity import AgentIdentity
from pickers.plugins.flowcontrol.detectors import ConcurrencyDetector, UtilizationDetector
from pickers.plugins.flowcontrol.eviction import PriorityThenTimeEvictionOrder, SheddableEvictionFilter
from pickers.plugins.flowcontrol.fairness import GlobalStrictFairness, RoundRobinFairness
from pickers.plugins.flowcontrol.ordering import EdfOrdering, FcfsOrdering, SloDeadlineOrdering
from pickers.plugins.flowcontrol.program_aware import ProgramAwareFairness
from pickers.plugins.flowcontrol.usage_limits import PriorityHoldback, SoftReflectiveCeiling, StaticUsageLimit
from pickers.plugins.latency.admitter import LatencySloAdmitter
from pickers.plugins.latency.cost import LatencyCostScorer
from pickers.plugins.latency.legacy_scorer import PredictedLatencyScorer
from pickers.plugins.latency.producer import PredictedLatencyProducer
from pickers.plugins.latency.scorer import LatencyScorer
from pickers.plugins.latency.slo_branch import SloRequestTracker, SloScorer
from pickers.plugins.latency.tier_filter import SloHeadroomTierFilter
from pickers.plugins.picker.max_score import MaxScorePicker
from pickers.plugins.picker.random import RandomPicker
from pickers.plugins.picker.round_robin import RoundRobinPicker
from pickers.plugins.picker.weighted_random import WeightedRandomPicker
from pickers.plugins.producer.burst_prefix import BurstPrefixCacheProducer
from pickers.plugins.latency.observer import LatencyObserverProducer
from pickers.plugins.producer.p2p_source import P2PSourceProducer
from pickers.plugins.producer.session import SessionIDProducer
from pickers.plugins.producer.tokens import LegacyTokenizer, TokenProducer, tokenizers_pool
from pickers.plugins.profile.data_parallel import DataParallelProfileHandler
from pickers.plugins.profile.handlers import (
    DisaggHeadersHandler,
    DisaggProfileHandler,
    PdProfileHandler,
    PrefillHeaderHandler,
    SingleProfileHandler,
)
from pickers.plugins.profile.header import HeaderPhaseProfileHandler, HeaderProfileHandler
from pickers.plugins.profile.latency_pd_decider import LatencyPdDecider
from pickers.plugins.profile.slo_aware import SloAwareProfileHandler
from pickers.plugins.profile.pd_deciders import AlwaysDisaggMultimodalDecider, AlwaysDisaggPDDecider, PrefixBasedPDDecider
from pickers.plugins.requestcontrol.attribute_reporter import RequestAttributeReporter
from pickers.plugins.scorer.load.active_request import ActiveRequestScorer
from pickers.plugins.scorer.load.data_parallel import DataParallelBalanceScorer
from pickers.plugins.scorer.load.endpoint_attribute import EndpointAttributeScorer
from pickers.plugins.scorer.load.kv_cache import KVCacheUtilizationScorer, MulticlusterKVCacheUtilizationScorer
from pickers.plugins.latency.observation_scorer import LatencyObservationScorer
from pickers.plugins.scorer.load.load_aware import LoadAwareScorer
from pickers.plugins.scorer.affinity.header_label import HeaderLabelAffinityScorer
from pickers.plugins.scorer.load.lmetric import LMetricScorer
from pickers.plugins.scorer.affinity.lora_affinity import LoraAffinityScorer
from pickers.plugins.scorer.affinity.mm_embeddings import MMEmbeddingsCacheProducer, MMEmbeddingsCacheScorer
from pickers.plugins.scorer.affinity.no_hit_lru import NoHitLRUScorer
from pickers.plugins.scorer.affinity.precise_prefix import PrecisePrefixCacheProducer, PrecisePrefixCacheScorer
from pickers.plugins.scorer.load.prefill_load import PrefillLoadScorer
from pickers.plugins.scorer.affinity.prefix import (
    ApproxPrefixCacheProducer,
    MulticlusterApproxPrefixCacheProducer,
    MulticlusterPrefixCacheScorer,
    PrefixCacheScorer,
)
from pickers.plugins.scorer.load.queue import MulticlusterQueueScorer, QueueScorer
from pickers.plugins.scorer.load.running_requests import RunningRequestsSizeScorer
from pickers.plugins.scorer.affinity.session_affinity import (
    MulticlusterSessionAffinityFilter,
    SessionAffinityFilter,
    SessionAffinityScorer,
)
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, TokenLoadScorer
from pickers.plugins.scorer.affinity.topology_affinity import TopologyAffinityFilter, TopologyAffinityScorer
from pickers.plugins.screener.disaggregatedset_rollout import DisaggregatedSetRolloutScreener


@dataclass(slots=True, frozen=True)
class BuiltPlugin:
    plugin: object
    parameters: Mapping[str, Any]  # every parameter the plugin read, with the value it runs with
    warnings: tuple[str, ...] = ()


Factory = Callable[[str, Mapping[str, Any] | None, PluginContext], BuiltPlugin]


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
    DataParallelBalanceScorer,  # llm-epp's: where inside a lockstep DP group a request is free
    HeaderLabelAffinityScorer,
    ContextLengthAware,  # a scorer and, with enableFiltering, a filter
    LatencyScorer,  # predicted latency headroom (the latency model's predictions)
    TopologyAffinityScorer,  # P/D: the prefill pick near the decode pick
    LatencyCostScorer,  # llm-epp's: predicted TTFT plus the stall a prefill adds to the running batch
    PredictedLatencyScorer,  # GIE v1.x's one-plugin SLO scorer (deprecated: removed from GIE)
    SloScorer,  # GIE's unreleased slo-prediction-experimental branch
    MMEmbeddingsCacheScorer,  # multimodal items an endpoint probably holds the embeddings of
    EndpointAttributeScorer,  # a scalar endpoint attribute (custom metrics, GPU utilization)
    LMetricScorer,  # uncached prefill tokens x (requests in flight + 1), min-max (llm-d-router PR #2351)
    # filters
    ByLabelFilter,
    LabelSelectorFilter,
    ByLabelSelectorFilter,  # llm-d's deprecated name of label-selector-filter
    PrefillFilter,
    DecodeFilter,
    EncodeFilter,
    UtilizationFilter,
    EndpointAttributeFilter,
    ProbabilisticAdmitter,  # admission before flow control and scheduling
    SessionAffinityFilter,
    PrefixCacheAffinityFilter,
    ServedModelFilter,  # llm-epp's: reads the models-data-source's /v1/models lists
    SloHeadroomTierFilter,
    TopologyAffinityFilter,  # P/D: only prefill endpoints near the decode pick
    LatencySloAdmitter,  # admission after the data producers, before the profiles
    RequestLimitsAdmitter,  # llm-epp's guardrails (docs/guardrails.md): limits per objective or model
    ContentCheckAdmitter,  # and patterns in the prompt, refused or flagged
    # pickers
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    RoundRobinPicker,  # llm-epp's baseline; not a reference-picker type
    # profile handlers
    SingleProfileHandler,
    DisaggProfileHandler,
    PdProfileHandler,  # llm-d's older name for the P/D handler
    HeaderProfileHandler,
    HeaderPhaseProfileHandler,  # its pre-release name (llm-d-router PR #2134), default header EPP-Phase
    DataParallelProfileHandler,  # llm-d's deprecated rank routing through a primary port
    SloAwareProfileHandler,  # GIE's slo-prediction-experimental branch: `default`, or `slo` on request
    # disaggregation deciders (disagg-profile-handler's deciders.prefill / deciders.encode)
    PrefixBasedPDDecider,
    AlwaysDisaggPDDecider,
    AlwaysDisaggMultimodalDecider,
    LatencyPdDecider,  # llm-epp's: the latency model's P/D decision (also the prefill profile's scorer)
    # screeners: the candidates of every profile of a request (llm-d's request-control Screener)
    DisaggregatedSetRolloutScreener,
    # data producers (llm-d's): the prefix matches the prefix scorers read, and request data
    ApproxPrefixCacheProducer,
    PrecisePrefixCacheProducer,
    BurstPrefixCacheProducer,  # joint placement of the requests of a short window
    TokenProducer,
    LegacyTokenizer,  # llm-d's deprecated name of token-producer
    # how token-load-scorer, prefix-cache-affinity-filter and the in-flight counts count load
    InFlightLoadProducer,
    SessionIDProducer,
    P2PSourceProducer,
    PredictedLatencyProducer,  # per-candidate TTFT/TPOT from the online latency model
    SloRequestTracker,  # GIE's experimental branch: a request's TPOT SLO on its endpoint while it runs
    # request control on the response: a CEL value of the usage, as dynamic metadata for the gateway
    RequestAttributeReporter,
    MMEmbeddingsCacheProducer,  # which endpoint holds which multimodal item's encoder output
    # llm-d's deprecated header plugins: the disagg handler sets the header; their names are checked
    DisaggHeadersHandler,
    PrefillHeaderHandler,
    # data layer (dataLayer.sources and dataLayer.discovery name them; pickers.config.datalayer)
    MetricsDataSource,
    CoreMetricsExtractor,
    ModelsDataSource,
    ModelsDataExtractor,
    DcgmDataSource,
    DcgmExtractor,
    K8sNotificationSource,
    EndpointNotificationSource,
    FileDiscovery,
    TopologyExtractor,  # each endpoint's host, rack, zone, region from its pod (the topology plugins read it)
    # flow control (flowControl names them; pickers.config.flowcontrol)
    GlobalStrictFairness,
    RoundRobinFairness,
    ProgramAwareFairness,
    FcfsOrdering,
    EdfOrdering,
    SloDeadlineOrdering,
    StaticUsageLimit,
    PriorityHoldback,
    SoftReflectiveCeiling,
    ConcurrencyDetector,  # a filter too, in a profile that lists it
    UtilizationDetector,  # a filter too
    SheddableEvictionFilter,
    PriorityThenTimeEvictionOrder,
    AgentIdentity,
    # llm-d's multi-cluster variants: a cluster-scoped EPP whose endpoints are peer clusters
    MulticlusterFileDiscovery,
    MulticlusterMetricsDataSource,
    MulticlusterMetricsExtractor,
    MulticlusterKVCacheUtilizationScorer,
    MulticlusterQueueScorer,
    MulticlusterSessionAffinityFilter,
    MulticlusterPrefixCacheScorer,
    MulticlusterApproxPrefixCacheProducer,
    # llm-d's hub latency pair (llm-d-router PR #2371): TTFT observed per peer cluster, and its curve
    LatencyObserverProducer,
    LatencyObservationScorer,
)

# llm-d's Alpha plugin types (registered with StabilityAlpha in its runner): a config using one loads
# only with --allow-experimental-plugins, as llm-d's EPP refuses it otherwise. llm-d marks more types
# Alpha than these (session-affinity-filter, header-profile-handler, dcgm-*, endpoint-attribute-*,
# burst-prefix-cache-producer, ...); llm-epp gates the ones it implemented under this rule, the
# multi-cluster family and the hub latency pair.
ALPHA_TYPES = frozenset(
    {
        MulticlusterFileDiscovery.type,
        MulticlusterMetricsDataSource.type,
        MulticlusterMetricsExtractor.type,
        MulticlusterKVCacheUtilizationScorer.type,
        MulticlusterQueueScorer.type,
        MulticlusterSessionAffinityFilter.type,
        MulticlusterPrefixCacheScorer.type,
        MulticlusterApproxPrefixCacheProducer.type,
        LatencyObserverProducer.type,
        LatencyObservationScorer.type,
    }
)
EXPERIMENTAL_FLAG = "--allow-experimental-plugins"

# Types whose llm-d factory reads no parameters at all (`func XFactory(name string, _ *json.Decoder, ...)`
# in llm-d's pkg/, v0.10; the multicluster queue and KV-cache scorers hand theirs to those factories):
# llm-d ignores whatever `parameters` says, so here an unknown one loads with a warning naming it
# (Params.done(llmd_ignores=True)) instead of being refused. The request parsers are the same in llm-d
# (pickers.config.parsers). Every other type refuses an unknown parameter, as llm-d's strict decoding does.
LLMD_IGNORES_PARAMETERS = frozenset(
    {
        QueueScorer.type,
        KVCacheUtilizationScorer.type,
        RunningRequestsSizeScorer.type,
        LoraAffinityScorer.type,
        MulticlusterQueueScorer.type,
        MulticlusterKVCacheUtilizationScorer.type,
        PrefillFilter.type,
        DecodeFilter.type,
        EncodeFilter.type,
        SingleProfileHandler.type,
        AlwaysDisaggPDDecider.type,
        AlwaysDisaggMultimodalDecider.type,
        GlobalStrictFairness.type,
        RoundRobinFairness.type,
        FcfsOrdering.type,
        EdfOrdering.type,
        SloDeadlineOrdering.type,
        SheddableEvictionFilter.type,
        PriorityThenTimeEvictionOrder.type,
        ModelsDataExtractor.type,
        DcgmExtractor.type,
        EndpointNotificationSource.type,
    }
)


def _factory(cls: type[_Configurable]) -> Factory:
    def make(name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> BuiltPlugin:
        p = Params(parameters)
        plugin = cls.from_config(name, p, ctx)
        p.done(llmd_ignores=cls.type in LLMD_IGNORES_PARAMETERS)
        return BuiltPlugin(plugin, MappingProxyType(p.effective), tuple(p.warnings))

    return make


PLUGINS: Mapping[str, Factory] = MappingProxyType({cls.type: _factory(cls) for cls in _CLASSES})


def known_types() -> list[str]:
    return sorted(PLUGINS)


def build_plugin(type_name: str, name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> BuiltPlugin:
    """Build one plugin. Raises ConfigError for an unknown type, ParameterError for a bad parameter."""
    factory = PLUGINS.get(type_name)
    if factory is None:
        why = UNSUPPORTED_TYPES.get(type_name)
        if why is not None:
            raise ConfigError(f"plugin type {shown(type_name)} (llm-d router) is not supported: {why}")
        raise ConfigError(f"unknown plugin type {shown(type_name)}; known types: {', '.join(known_types())}")
    if ctx.tokenizers_pool is None:  # what precise-prefix-cache-scorer builds its tokenizersPoolConfig with
        ctx.tokenizers_pool = tokenizers_pool
    return factory(name, parameters, ctx)


def create_plugin(type_name: str, name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> object:
    return build_plugin(type_name, name, parameters, ctx).plugin
