"""EndpointPickerConfig (docs/configuration.md): YAML in, plugins and scheduling profiles out, validated once.

Errors name the source (a file path or `--config-text`), the field path (`schedulingProfiles[0].
plugins[1].pluginRef`) and what was expected. Defaults follow the reference picker: no profiles -> one
`default` profile with every filter, scorer and picker; one profile -> `single-profile-handler`; no
picker -> `max-score-picker`; weight 1. Several profiles need a profile handler (`disagg-profile-handler`
for P/D), which is bound to its profiles and decider by name once everything is built. A plugin that is both a
filter and a scorer (context-length-aware) runs as both in a profile that references it, as in llm-d.

Request parsers (`requestHandler.parsers`, GIE's top-level `parser`) are declared under `plugins:` and
resolved by pickers.config.parsers into `EndpointPickerConfig.parsers`; the server runs them.

Nothing is accepted and ignored: a section, gate or parameter llm-epp does not act on is refused with
a message naming it and why (docs/configuration.md has the table). Deprecated forms that still mean
something (the old apiVersion, renamed or unused parameters) load with a warning, logged once per load
and kept in `EndpointPickerConfig.warnings` for `epp check-config`.

A reload (`load_config(..., previous=cfg)`, extproc.server.reload) keeps the state of each plugin it
finds unchanged (same name, type and parameters as written): the new config gets a shallow copy of
the previous instance, which shares its learned state (session bindings, LRUs, a precise index and
its KV-event feed, a tokenizer) and is bound afresh to the new config's plugins, while the previous
instance, still serving requests that started on it, is left as it was. Profile handlers are always
built anew: they hold no learned state, and their binding appends to what they hold.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pickers.config import safe_yaml
from pickers.config.datalayer import (
    DEFAULT_DATA_LAYER,
    DataLayerConfig,
    build_data_layer,
)
from pickers.config.flowcontrol import FlowControlLoader
from pickers.config.parsers import (
    DEFAULT_PARSERS,
    REFUSED_PARSER_TYPES,
    ParserSpec,
    is_parser_type,
    resolve_parsers,
)
from pickers.config.registry import (
    ALPHA_TYPES,
    EXPERIMENTAL_FLAG,
    BuiltPlugin,
    build_plugin,
    create_plugin,
)
from pickers.framework.errors import ConfigError, shown
from pickers.framework.flowcontrol import FairnessPolicy, FlowControlConfig
from pickers.framework.params import ParameterError, Params
from pickers.framework.types import (
    Admitter,
    AsyncDataProducer,
    CycleAdmitter,
    DataProducer,
    Filter,
    Picker,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseReporter,
    SchedulingProfile,
    Scorer,
    Screener,
    WeightedScorer,
)
from pickers.plugins.base import ImpliesProducers, PluginContext
from pickers.plugins.producer.tokens import TokenProducer
from pickers.plugins.profile.handlers import SingleProfileHandler
from pickers.plugins.scorer.affinity.prefix import PrefixCacheScorer

log = logging.getLogger(__name__)

API_VERSION = "llm-d.ai/v1alpha1"
DEPRECATED_API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
API_VERSIONS = ("llm-d.ai/v1", API_VERSION, DEPRECATED_API_VERSION)
KIND = "EndpointPickerConfig"
_TOP_LEVEL = (
    "apiVersion", "kind", "plugins", "schedulingProfiles", "featureGates", "saturationDetector", "flowControl", "dataLayer",
    "requestHandler", "parser",
)  # fmt: skip
# llm-d's sections llm-epp does not implement: refused by name, with the reason (none at present)
UNSUPPORTED_SECTIONS: MappingProxyType[str, str] = MappingProxyType(
    {
    }
)
# featureGates llm-d registers, and what llm-epp makes of each
FEATURE_GATES = MappingProxyType(
    {
        # on: the flowControl section holds requests in priority bands (pickers.config.flowcontrol)
        "flowControl": "flow control",
        # a replica that is not the leader keeps its endpoint table current, so it can take over at once
        "haPopulateNonLeaderDatastore": "llm-epp always keeps a non-leader's endpoint table populated; it cannot be turned off",
        # GIE's gate for data producers (prefix match before scheduling): llm-epp always runs them
        "prepareDataPlugins": "llm-epp always runs its data producers; they cannot be turned off",
    }
)
_GATE_EITHER_WAY = frozenset({"flowControl"})  # the others: on is what we do, off is refused
_PLUGIN_KEYS = ("name", "type", "parameters")
_PROFILE_KEYS = ("name", "plugins")
_REF_KEYS = ("pluginRef", "weight")
DEFAULT_PICKER = "max-score-picker"

# The reference picker's default (GIE): `epp serve` with no config and `--strategy default` use it.
DEFAULT_CONFIG_TEXT = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""


@dataclass(slots=True, frozen=True)
class PluginBuild:
    """How one plugin of a config was built: what a reload compares to decide whether to keep it."""

    type: str
    written: object  # its parameters as written, in a form that compares exactly (see `_written`)
    built: BuiltPlugin


@dataclass(slots=True, frozen=True)
class EndpointPickerConfig:
    source: str
    api_version: str
    plugins: Mapping[str, object]  # by name, in config order
    profiles: tuple[SchedulingProfile, ...]
    profile_handler: ProfileHandler
    feature_gates: tuple[str, ...] = ()  # as written; only gates that change nothing here load
    saturation_detector: Mapping[str, Any] = field(default_factory=dict)  # read by extproc.requestcontrol.saturation
    plugin_types: Mapping[str, str] = field(default_factory=dict)  # name -> type
    plugin_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> effective parameters
    warnings: tuple[str, ...] = ()  # deprecations and adjusted values, each logged once when loaded
    data_layer: DataLayerConfig = DEFAULT_DATA_LAYER  # dataLayer, defaults injected; applied by extproc.server
    # flowControl with its defaults and references resolved; None while the flowControl gate is off
    flow_control: FlowControlConfig | None = None
    # flowControl.saturationDetector's detector with the flowControl gate off: llm-d's legacy admission
    admission_detector: object | None = None
    parsers: tuple[ParserSpec, ...] = DEFAULT_PARSERS  # the request parsers in effect, in order (extproc.handlers.parsers)
    default_parsers: bool = True  # no requestHandler.parsers (nor parser): llm-d's default list
    # the data producers: plugins outside the profiles that run for every request (token-producers
    # first, then config order; those a plugin implies after the config's own); the scheduler runs
    # them before each cycle
    producers: tuple[object, ...] = ()
    builds: Mapping[str, PluginBuild] = field(default_factory=dict)  # name -> how it was built (reloads compare)
    kept: tuple[str, ...] = ()  # loaded as a reload: the plugins carried over from the previous config, state kept

    @property
    def profile(self) -> SchedulingProfile:
        """The first profile: the only one unless a handler such as disagg-profile-handler runs several."""
        return self.profiles[0]


def load_config_file(path: str | Path, ctx: PluginContext | None = None, *, allow_experimental: bool = False) -> EndpointPickerConfig:
    return load_config(safe_yaml.read_text(path, what="config file"), str(path), ctx, allow_experimental=allow_experimental)


def load_config(
    text: str, source: str, ctx: PluginContext | None = None, *, previous: EndpointPickerConfig | None = None,
    allow_experimental: bool = False,
) -> EndpointPickerConfig:
    """Parse, validate and build. `ctx` carries the shared prefix index, datastore and rng. With
    `previous` (a reload; give it the same `ctx`), unchanged plugins keep their state (see the module
    doc); `previous` itself is not modified. `allow_experimental` (--allow-experimental-plugins) lets
    llm-d's Alpha plugin types load (registry.ALPHA_TYPES)."""
    cfg = _Loader(source, ctx or PluginContext(), previous, allow_experimental).load(text)
    for w in cfg.warnings:
        log.warning("%s: %s", source, w)
    return cfg


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__)


class _Loader:
    def __init__(
        self, source: str, ctx: PluginContext, previous: EndpointPickerConfig | None = None, allow_experimental: bool = False
    ) -> None:
        self.source = source
        self.allow_experimental = allow_experimental
        self.ctx = ctx
        self.previous = previous.builds if previous is not None else {}
        self.builds: dict[str, PluginBuild] = {}
        self.kept: list[str] = []
        self.warnings: list[str] = []
        self.types: dict[str, str] = {}
        self.parameters: dict[str, Mapping[str, Any]] = {}
        self.parser_plugins: dict[str, str] = {}  # name -> type, for requestHandler.parsers
        self.index: dict[str, int] = {}  # plugin name -> its place in `plugins:` (parsers included)
        self.admission_detector: object | None = None  # set by flow_control()

    def error(self, field_path: str | None, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=field_path or None)

    def expect_mapping(self, value: object, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if k not in keys:
                where = f"{path}.{k}" if path else str(k)
                raise self.error(where, f"unknown field; expected one of {', '.join(keys)}")
        return value

    def expect_list(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {_kind(value)}")
        return value

    def expect_name(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {_kind(value)} {shown(value)}")
        return value

    def load(self, text: str) -> EndpointPickerConfig:
        doc = safe_yaml.parse(text, source=self.source)
        if doc is None:
            raise self.error(None, f"empty; expected an {KIND} document")
        if isinstance(doc, dict):
            for key, why in UNSUPPORTED_SECTIONS.items():
                if key in doc:
                    raise self.error(key, f"not supported: {why}")
        doc = self.expect_mapping(doc, "", _TOP_LEVEL)
        api_version = doc.get("apiVersion")
        if api_version not in API_VERSIONS:
            raise self.error("apiVersion", f"expected one of {', '.join(API_VERSIONS)}, got {shown(api_version)}")
        if api_version == DEPRECATED_API_VERSION:
            self.warnings.append(f"DEPRECATION: apiVersion {DEPRECATED_API_VERSION} is deprecated; use {API_VERSION}")
        if doc.get("kind") != KIND:
            raise self.error("kind", f"expected {KIND}, got {shown(doc.get('kind'))}")
        gates = self.feature_gates(doc.get("featureGates"))

        plugins = self.build_plugins(doc.get("plugins"))
        self.check_stability()
        others = {n: t for n, t in self.types.items() if n not in self.parser_plugins}
        parsers, default_parsers = resolve_parsers(doc, self.parser_plugins, others, self.error, self.warnings)
        handlers = {n: p for n, p in plugins.items() if isinstance(p, ProfileHandler)}
        if len(handlers) > 1:
            raise self.error("plugins", f"expected at most one profile handler, got {', '.join(handlers)}")
        profiles = self.build_profiles(doc.get("schedulingProfiles"), plugins)
        data_layer = self.data_layer(doc.get("dataLayer"), plugins)
        handler = next(iter(handlers.values()), None)
        if handler is None:
            if len(profiles) > 1:
                raise self.error(
                    "schedulingProfiles",
                    f"{len(profiles)} profiles need a profile handler plugin such as disagg-profile-handler "
                    "(prefill/decode); only single-profile-handler is implied, and it runs one profile",
                )
            handler = SingleProfileHandler()
        by_name = {p.name: p for p in profiles}
        # prefix scorers first: what binds to them (no-hit-lru, the P/D decider) reads their bound settings
        ordered = sorted(plugins.values(), key=lambda q: not isinstance(q, PrefixCacheScorer))
        for plugin in ordered:
            bind = getattr(plugin, "bind_config", None)
            if bind is not None:
                self.bind_plugin(plugins, plugin, lambda b=bind: b(plugins, by_name, handler))
        self.bind_plugin(plugins, handler, lambda: handler.bind(plugins, by_name))
        for name, plugin in plugins.items():
            # what a plugin found wrong but loadable once names were resolved (as llm-d loads it)
            where = f"plugins[{self.index[name]}] ({self.types[name]})"
            self.warnings.extend(f"{where}: {w}" for w in getattr(plugin, "bind_warnings", ()))
        saturation = self.optional_mapping(doc, "saturationDetector")
        flow_control = self.flow_control(doc.get("flowControl"), _gate_on(gates, "flowControl"), saturation, plugins, profiles)
        for name, plugin in plugins.items():
            effective = getattr(plugin, "effective_parameters", None)
            if effective is not None:
                self.parameters[name] = MappingProxyType(dict(effective(self.parameters[name])))

        # a scorer or filter listed in no profile keeps its request-life hooks too (as in llm-d, where
        # every plugin is registered for what it implements): e.g. a latency-pd-decider named only
        # as the handler's decider still charges the in-flight counts its predictions read
        profiled = {id(q) for prof in profiles for q in prof.plugins()}
        configured = [q for q in plugins.values() if id(q) not in profiled and not isinstance(q, ProfileHandler) and isinstance(
            q, (DataProducer, AsyncDataProducer, PreRequest, ResponseComplete, ResponseReporter, Admitter, CycleAdmitter, Screener))]  # fmt: skip
        # what a plugin brings with it runs after the config's own (the old precise scorer's tokenizer pool:
        # a token-producer asked after the config's, for the requests they gave no ids)
        implied = [q for p in plugins.values() if isinstance(p, ImpliesProducers) for q in p.implied_producers()]
        producers = sorted([*configured, *implied], key=lambda q: not isinstance(q, TokenProducer))  # stable: config order
        return EndpointPickerConfig(
            source=self.source,
            api_version=api_version,
            plugins=plugins,
            profiles=profiles,
            profile_handler=handler,
            feature_gates=gates,
            saturation_detector={k: v for k, v in saturation.items() if k != "pluginRef"},
            flow_control=flow_control,
            admission_detector=self.admission_detector,
            plugin_types=MappingProxyType(self.types),
            plugin_parameters=MappingProxyType(self.parameters),
            warnings=tuple(self.warnings),
            data_layer=data_layer,
            parsers=parsers,
            default_parsers=default_parsers,
            producers=tuple(producers),
            builds=MappingProxyType(self.builds),
            kept=tuple(self.kept),
        )

    def check_stability(self) -> None:
        """llm-d's rule for its Alpha plugins: they load only with --allow-experimental-plugins."""
        if self.allow_experimental:
            return
        alpha = [(n, t) for n, t in self.types.items() if t in ALPHA_TYPES]
        if alpha:
            name, type_name = alpha[0]
            more = f" (also {', '.join(f'{n} ({t})' for n, t in alpha[1:])})" if alpha[1:] else ""
            raise self.error(
                f"plugins[{self.index[name]}].type",
                f"plugin {shown(name)} (type {type_name}) has Alpha stability in llm-d, and {EXPERIMENTAL_FLAG} "
                f"is not set{more}: start the EPP with {EXPERIMENTAL_FLAG}, as llm-d requires",
            )

    def bind_plugin(self, plugins: dict[str, object], plugin: object, bind: Any) -> None:
        """Run a plugin's by-name binding; a ParameterError becomes an error at that plugin's parameter."""
        try:
            bind()
        except ParameterError as e:
            name = getattr(plugin, "name", "")
            i = self.index.get(name, 0)
            param = f"plugins[{i}].parameters.{e.param}" if e.param else f"plugins[{i}]"
            raise self.error(param, f"{getattr(plugin, 'type', '?')}: {e.detail}") from None

    def feature_gates(self, raw: object) -> tuple[str, ...]:
        """llm-d's form, `name` or `name=true|false`; only gates whose setting is what llm-epp does load."""
        gates = self.expect_list(raw, "featureGates")
        for i, g in enumerate(gates):
            path = f"featureGates[{i}]"
            name, _, value = self.expect_name(g, path).partition("=")
            why = FEATURE_GATES.get(name)
            if why is None:
                raise self.error(path, f"unknown feature gate {shown(name)}; known: {', '.join(FEATURE_GATES)}")
            on = True
            if value:
                v = value.strip().lower()
                if v not in ("true", "false", "1", "0", "t", "f"):
                    raise self.error(path, f"expected {name}=true or {name}=false, got {shown(g)}")
                on = v in ("true", "1", "t")
            if not on and name not in _GATE_EITHER_WAY:
                raise self.error(path, f"{name}={'true' if on else 'false'} is not supported: {why}")
        return tuple(gates)

    def flow_control(
        self, raw: object, enabled: bool, saturation: dict[str, Any], plugins: dict[str, object],
        profiles: tuple[SchedulingProfile, ...],
    ) -> FlowControlConfig | None:  # fmt: skip
        """flowControl (pickers.config.flowcontrol): None unless the flowControl gate is on; the defaults
        it makes join `plugins`."""
        listed = frozenset(id(q) for prof in profiles for q in prof.plugins())
        fc = FlowControlLoader(
            plugins, self.types, self.parameters, lambda name: f"plugins[{self.index[name]}]", self.ctx,
            self.error, self.warnings, listed,
        )  # fmt: skip
        built = fc.build(raw, enabled, saturation)
        self.admission_detector = fc.admission_detector
        return built

    def data_layer(self, raw: object, plugins: dict[str, object]) -> DataLayerConfig:
        """dataLayer (pickers.config.datalayer), resolved against the plugins; defaults when absent."""
        return build_data_layer(raw, plugins, lambda name: f"plugins[{self.index[name]}]", self.error, self.warnings)

    def optional_mapping(self, doc: dict[str, Any], key: str) -> dict[str, Any]:
        value = doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_kind(value)}")
        return value

    def build_plugins(self, raw: object) -> dict[str, object]:
        items = self.expect_list(raw, "plugins")
        if not items:
            raise self.error("plugins", "expected a non-empty list of plugins")
        plugins: dict[str, object] = {}
        first_at = self.index
        for i, item in enumerate(items):
            path = f"plugins[{i}]"
            spec = self.expect_mapping(item, path, _PLUGIN_KEYS)
            type_name = self.expect_name(spec.get("type"), f"{path}.type")
            name = self.expect_name(spec.get("name", type_name), f"{path}.name")
            if name in first_at:
                raise self.error(
                    f"{path}.name",
                    f"duplicate plugin name {shown(name)} (also plugins[{first_at[name]}]); give each instance its own name",
                )
            if is_parser_type(type_name):
                self.parser_plugin(path, name, type_name, spec.get("parameters"))
                first_at[name] = i
                continue
            written = _written(spec.get("parameters"))
            before = self.previous.get(name)
            if before is not None and (before.type, before.written) == (type_name, written) and not isinstance(
                before.built.plugin, ProfileHandler
            ):
                built = BuiltPlugin(copy.copy(before.built.plugin), before.built.parameters, before.built.warnings)
                self.kept.append(name)
            else:
                try:
                    built = build_plugin(type_name, name, spec.get("parameters"), self.ctx)
                except ParameterError as e:
                    param = f"{path}.parameters.{e.param}" if e.param else f"{path}.parameters"
                    raise self.error(param, f"{type_name}: {e.detail}") from None
                except ConfigError as e:
                    raise self.error(f"{path}.type", str(e)) from None
            self.builds[name] = PluginBuild(type_name, written, built)
            plugins[name] = built.plugin
            self.types[name] = type_name
            self.parameters[name] = built.parameters
            self.warnings.extend(f"{path} ({type_name}): {w}" for w in built.warnings)
            first_at[name] = i
        return plugins

    def parser_plugin(self, path: str, name: str, type_name: str, parameters: object) -> None:
        """A request parser under `plugins:`: no object here, the server builds it from its ParserSpec."""
        why = REFUSED_PARSER_TYPES.get(type_name)
        if why is not None:
            raise self.error(f"{path}.type", f"{type_name} is not supported: {why}")
        # llm-d's parser factories read no parameters: what a config gives loads, named in a warning
        try:
            p = Params(parameters)  # type: ignore[arg-type]
            p.done(llmd_ignores=True)
        except ParameterError as e:
            raise self.error(f"{path}.parameters", f"{type_name}: {e.detail}") from None
        self.warnings.extend(f"{path} ({type_name}): {w}" for w in p.warnings)
        self.parser_plugins[name] = type_name
        self.types[name] = type_name
        self.parameters[name] = MappingProxyType({})

    def build_profiles(self, raw: object, plugins: dict[str, object]) -> tuple[SchedulingProfile, ...]:
        items = self.expect_list(raw, "schedulingProfiles")
        if not items:
            # every filter, scorer and picker, in config order, weight 1
            refs = [(f"plugins[{self.index[n]}]", {"pluginRef": n}) for n, p in plugins.items() if _role(p) is not None]
            return (self.build_profile("default", refs, plugins, implicit=True),)
        profiles: list[SchedulingProfile] = []
        for i, item in enumerate(items):
            path = f"schedulingProfiles[{i}]"
            spec = self.expect_mapping(item, path, _PROFILE_KEYS)
            name = self.expect_name(spec.get("name"), f"{path}.name")
            if any(p.name == name for p in profiles):
                raise self.error(f"{path}.name", f"duplicate profile name {shown(name)}")
            refs = self.expect_list(spec.get("plugins"), f"{path}.plugins")
            profiles.append(self.build_profile(name, [(f"{path}.plugins[{j}]", r) for j, r in enumerate(refs)], plugins))
        return tuple(profiles)

    def build_profile(
        self, name: str, refs: list[tuple[str, Any]], plugins: dict[str, object], *, implicit: bool = False
    ) -> SchedulingProfile:
        """`refs`: (field path, {pluginRef, weight?}); implicit = the default profile made from `plugins`."""
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        picker: Picker | None = None
        seen: set[str] = set()
        for rpath, ref in refs:
            spec = self.expect_mapping(ref, rpath, _REF_KEYS)
            ref_path = rpath if implicit else f"{rpath}.pluginRef"
            plugin_name = self.expect_name(spec.get("pluginRef"), ref_path)
            plugin = plugins.get(plugin_name)
            if plugin is None and plugin_name in self.parser_plugins:
                raise self.error(
                    ref_path,
                    f"plugin {shown(plugin_name)} ({self.parser_plugins[plugin_name]}) is a request parser, not a "
                    "filter, scorer or picker; list it under requestHandler.parsers",
                )
            if plugin is None:
                raise self.error(
                    ref_path, f"no plugin named {shown(plugin_name)}; defined: {', '.join(plugins) or 'none'}"
                )
            if plugin_name in seen:
                raise self.error(ref_path, f"plugin {shown(plugin_name)} is already in profile {shown(name)}")
            seen.add(plugin_name)
            role = _role(plugin)
            if role is None and not isinstance(plugin, ProfileHandler) and isinstance(
                plugin, (DataProducer, Admitter, CycleAdmitter, Screener, PreRequest, ResponseComplete)
            ):
                # llm-d lists its request-control plugins in a profile too (its predicted-latency
                # config does, GIE's SLO configs list slo-request-tracker); llm-d's profile takes what
                # is a filter, scorer or picker and the plugin keeps its other hooks, run once per
                # request wherever it is listed
                continue
            if role is None:
                raise self.error(
                    ref_path,
                    f"plugin {shown(plugin_name)} ({getattr(plugin, 'type', '?')}) is not a filter, scorer or picker",
                )
            if role == "scorer":
                weight = self.weight(spec.get("weight"), f"{rpath}.weight")
                scorers.append(WeightedScorer(plugin, weight))  # type: ignore[arg-type]
                if isinstance(plugin, Filter):
                    filters.append(plugin)  # both (context-length-aware): runs as both, as in llm-d
            elif role == "filter":
                filters.append(plugin)  # type: ignore[arg-type]
            else:
                if picker is not None:
                    raise self.error(
                        ref_path,
                        f"profile {shown(name)} already has picker {shown(picker.name)}; expected one picker per profile",
                    )
                picker = plugin  # type: ignore[assignment]
            # a weight on a filter or picker means nothing; the reference picker ignores it too
        if picker is None:
            picker = create_plugin(DEFAULT_PICKER, DEFAULT_PICKER, None, self.ctx)  # type: ignore[assignment]
        assert picker is not None
        return SchedulingProfile(name, picker, scorers, filters)

    def weight(self, value: object, path: str) -> float:
        if value is None:
            return 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise self.error(path, f"expected a finite number >= 0, got {shown(value)}")
        return float(value)


def _written(value: object) -> object:
    """Parameters as written, tagged with their types: `1`, `1.0` and `true` are equal in Python but
    not the same parameter; mapping order does not matter."""
    if isinstance(value, dict):
        return ("map", tuple(sorted(((repr(k), _written(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, list):
        return ("list", tuple(_written(v) for v in value))
    return (type(value).__name__, value)


def _gate_on(gates: tuple[str, ...], gate: str) -> bool:
    """Whether `gate` is on: its last setting (a bare name is on), as llm-d reads them."""
    on = False
    for g in gates:
        name, _, value = g.partition("=")
        if name == gate:
            on = not value or value.strip().lower() in ("true", "1", "t")
    return on


def _role(plugin: object) -> str | None:
    if isinstance(plugin, (ProfileHandler, FairnessPolicy)):
        return None  # they have a `pick` too, but pick profiles or flows, not endpoints
    if isinstance(plugin, Picker):
        return "picker"
    if isinstance(plugin, Scorer):
        return "scorer"
    if isinstance(plugin, Filter):
        return "filter"
    return None
