"""The `flowControl` section (llm-d's FlowControlConfig) and the `flowControl` feature gate, resolved
into a pickers.framework.flowcontrol.FlowControlConfig for the runtime (extproc.flowcontrol).

Fields: `priorityBands[]` ({priority, maxRequests, maxBytes, fairnessPolicyRef, orderingPolicyRef}),
`defaultPriorityBand` and `defaultNegativePriorityBand` (templates for unlisted priorities, below 0
for the negative one, which falls back to the default one), global `maxRequests` / `maxBytes`
(Kubernetes quantities: 100, "1k", "1Gi"; 0 or absent: no global limit; a band's 0 or absent: 5000
requests, 1G bytes), `defaultRequestTTL` (60s; "0s": no limit) and `noEndpointRequestTTL` (follows
defaultRequestTTL, else 60s), `usageLimitPolicyPluginRef`, `saturationDetector: {pluginRef}` and
`enableEviction`. As llm-d's ensureFlowControlLayer, policies are found by name, and the defaults a
config leaves out are made with default parameters: `fcfs-ordering-policy`,
`global-strict-fairness-policy`, `static-usage-limit-policy`, `utilization-detector`; a band leaving a
policy out gets that default (not the default band's).

Gate off: llm-d ignores the section (it logs a warning); here it is still checked and loads with a
warning, `flow_control` is None, and the flow-control plugins load with a warning that they do
nothing. The one field llm-d honours without the gate, `saturationDetector`, picks the detector of
llm-d's legacy admission, and here too: named, it is `admission_detector` (sheddable requests are refused
while it reads saturated); unnamed, admission reads the top-level `saturationDetector` thresholds.

The top-level `saturationDetector` holds GIE's thresholds (queueDepthThreshold, kvCacheUtilThreshold,
metricsStalenessThreshold), read by extproc.requestcontrol.saturation. With the gate on they are the
defaults of the utilization-detector flow control uses (one saturation signal for the EPP); a
declared utilization-detector setting one of them differently, or a non-utilization detector, is
refused. Its `pluginRef` (llm-d's deprecated spelling of flowControl.saturationDetector) loads with a
deprecation warning when the gate is on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from pickers.config.registry import build_plugin
from pickers.framework.errors import ConfigError, shown
from pickers.framework.flowcontrol import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_BAND_MAX_REQUESTS,
    DEFAULT_REQUEST_TTL,
    BandConfig,
    FlowControlConfig,
    fairness_id_from_headers,
)
from pickers.framework.params import ParameterError, parse_go_duration
from pickers.plugins.base import PluginContext
from pickers.plugins.flowcontrol.agent_identity import AgentIdentity
from pickers.plugins.flowcontrol.detectors import (
    ConcurrencyDetector,
    UtilizationDetector,
)
from pickers.plugins.flowcontrol.eviction import (
    PriorityThenTimeEvictionOrder,
    SheddableEvictionFilter,
)
from pickers.plugins.flowcontrol.fairness import (
    GlobalStrictFairness,
    RoundRobinFairness,
)
from pickers.plugins.flowcontrol.ordering import EdfOrdering, FcfsOrdering, SloDeadlineOrdering
from pickers.plugins.flowcontrol.program_aware import ProgramAwareFairness
from pickers.plugins.flowcontrol.usage_limits import (
    PriorityHoldback,
    SoftReflectiveCeiling,
    StaticUsageLimit,
)

GATE = "flowControl"
_SECTION_KEYS = (
    "priorityBands", "defaultPriorityBand", "defaultNegativePriorityBand", "maxRequests", "maxBytes",
    "defaultRequestTTL", "noEndpointRequestTTL", "usageLimitPolicyPluginRef", "saturationDetector", "enableEviction",
)  # fmt: skip
_BAND_KEYS = ("priority", "maxRequests", "maxBytes", "fairnessPolicyRef", "orderingPolicyRef")
_DETECTOR_KEYS = ("pluginRef",)
THRESHOLDS = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold")

# role -> (the classes that play it, the default plugin's name = its type)
_ROLES: Mapping[str, tuple[tuple[type, ...], str | None]] = MappingProxyType(
    {
        "ordering policy": ((FcfsOrdering, EdfOrdering, SloDeadlineOrdering), FcfsOrdering.type),
        "fairness policy": ((GlobalStrictFairness, RoundRobinFairness, ProgramAwareFairness), GlobalStrictFairness.type),
        "usage limit policy": ((StaticUsageLimit, PriorityHoldback, SoftReflectiveCeiling), StaticUsageLimit.type),
        "saturation detector": ((UtilizationDetector, ConcurrencyDetector), UtilizationDetector.type),
        "eviction filter": ((SheddableEvictionFilter,), SheddableEvictionFilter.type),
        "eviction ordering": ((PriorityThenTimeEvictionOrder,), PriorityThenTimeEvictionOrder.type),
    }
)
FLOW_CONTROL_CLASSES: tuple[type, ...] = tuple(c for classes, _ in _ROLES.values() for c in classes) + (AgentIdentity,)

_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}  # fmt: skip
_MAX_QUANTITY = 2**63 - 1


def parse_quantity(value: object) -> int | None:
    """A Kubernetes resource.Quantity's Value() (rounded up to a whole number): 100, 1.5, "1k", "1Gi",
    "1e3"; None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return math.ceil(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    m = _QUANTITY.match(value.strip())
    if m is None:
        return None
    try:
        number = Decimal(m.group(1))
        scale = Decimal(10) ** int(m.group(2)[1:]) if m.group(2) else _SUFFIX[m.group(3)]
        return int((number * scale).to_integral_value(rounding="ROUND_CEILING"))
    except (InvalidOperation, OverflowError, ValueError):
        return None


class FlowControlLoader:
    """Builds the section against the config's plugins. `error(field, message)` is the loader's
    ConfigError; `where(name)` names a declared plugin (`plugins[2]`)."""

    def __init__(
        self,
        plugins: dict[str, object],
        types: dict[str, str],
        parameters: dict[str, Mapping[str, Any]],
        where: Callable[[str], str],
        ctx: PluginContext,
        error: Callable[[str | None, str], ConfigError],
        warnings: list[str],
        in_profiles: frozenset[int] = frozenset(),
    ) -> None:
        self.plugins = plugins
        self.types = types
        self.parameters = parameters
        self.where = where
        self.ctx = ctx
        self.error = error
        self.warnings = warnings
        self.in_profiles = in_profiles  # ids of plugins some scheduling profile lists
        self.used: set[str] = set()  # flow-control plugins the section uses
        self.made: dict[str, object] = {}  # defaults made because the config has no plugin of that name
        self.admission_detector: object | None = None  # gate off: the detector flowControl.saturationDetector names

    def build(self, raw: object, enabled: bool, top: Mapping[str, Any]) -> FlowControlConfig | None:
        section = self.section(raw)
        top_ref = top.get("pluginRef")
        detector_ref = self.detector_ref(section, top_ref, enabled)
        if not enabled:
            configured = [k for k in section if k != "saturationDetector"]
            if configured:
                self.warnings.append(
                    f"flowControl.{configured[0]}: the flowControl section is set but the {GATE} feature gate is off; "
                    "its settings are checked and not used (as llm-d); add featureGates: [flowControl] to use them"
                )
        fc = self.resolve(section, detector_ref, enabled, top)
        if not enabled and detector_ref[1] is not None:
            # llm-d's legacy admission: without the gate, the named detector decides when the pool is
            # saturated, and sheddable requests are refused then
            self.admission_detector = fc.saturation_detector
            self.used.add(detector_ref[0])
            self.adopt_made(detector_ref[0])
        self.warn_unused(enabled)
        if not enabled:
            return None
        for name in list(self.made):  # llm-d adds the defaults it makes to the config's plugins
            self.adopt_made(name)
        return fc

    def adopt_made(self, name: str) -> None:
        plugin = self.made.get(name)
        if plugin is not None:
            self.plugins[name] = plugin
            self.types[name] = getattr(plugin, "type", name)

    # -- shapes ------------------------------------------------------------------------------------

    def section(self, raw: object) -> dict[str, Any]:
        if raw is None:
            return {}
        return self.mapping(raw, "flowControl", _SECTION_KEYS)

    def mapping(self, value: object, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {shown(value)}")
        for k in value:
            if k not in keys:
                raise self.error(f"{path}.{k}", f"unknown field; expected one of {', '.join(keys)}")
        return value

    def quantity(self, section: Mapping[str, Any], key: str, path: str) -> int:
        """0 when absent; refuses malformed and negative values."""
        value = section.get(key)
        if value is None:
            return 0
        n = parse_quantity(value)
        if n is None:
            raise self.error(f"{path}.{key}", f"expected a Kubernetes quantity such as 100, \"1k\" or \"1Gi\", got {shown(value)}")
        if n < 0:
            raise self.error(f"{path}.{key}", f"must be non-negative, got {shown(value)}")
        if n > _MAX_QUANTITY:
            raise self.error(f"{path}.{key}", f"too large: {shown(value)}")
        return n

    def duration(self, section: Mapping[str, Any], key: str) -> float | None:
        value = section.get(key)
        if value is None:
            return None
        seconds = parse_go_duration(value) if isinstance(value, str) else None
        if seconds is None:
            raise self.error(f"flowControl.{key}", f"expected a duration such as \"60s\", \"1m30s\" or \"0s\", got {shown(value)}")
        if seconds < 0:
            raise self.error(f"flowControl.{key}", f"must not be negative, got {shown(value)}")
        return seconds

    def name(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected the name of a plugin, got {shown(value)}")
        return value

    # -- references --------------------------------------------------------------------------------

    def plugin(self, role: str, name: str, path: str | None) -> Any:
        """The plugin `name` playing `role`: declared, or (for the role's default name) made with
        default parameters. `path` None: the default, which the config did not name."""
        classes, default = _ROLES[role]
        found = self.plugins.get(name, self.made.get(name))
        if found is None:
            if name != default:
                defined = ", ".join(self.plugins) or "none"
                raise self.error(path, f"no plugin named {shown(name)}; defined: {defined}")
            found = self.made[name] = self.make(name)
        if not isinstance(found, classes):
            kinds = ", ".join(c.type for c in classes)  # type: ignore[attr-defined]
            what = f"plugin {shown(name)} ({getattr(found, 'type', '?')})"
            raise self.error(path or self.where(name), f"{what} is not a {role} ({kinds})")
        self.used.add(name)
        return found

    def make(self, type_name: str, parameters: Mapping[str, Any] | None = None, path: str | None = None) -> object:
        try:
            built = build_plugin(type_name, type_name, parameters, self.ctx)
        except ParameterError as e:
            # parameters of a made default come from the top-level saturationDetector section
            raise self.error(f"saturationDetector.{e.param}" if e.param else path, f"{type_name}: {e.detail}") from None
        self.parameters[type_name] = built.parameters
        return built.plugin

    def detector_ref(self, section: Mapping[str, Any], top_ref: object, enabled: bool) -> tuple[str, str | None]:
        """(the detector's name, the field that named it, None for the default)."""
        raw = section.get("saturationDetector")
        ref: str | None = None
        path: str | None = None
        if raw is not None:
            spec = self.mapping(raw, "flowControl.saturationDetector", _DETECTOR_KEYS)
            if spec.get("pluginRef") is not None:
                ref = self.name(spec["pluginRef"], "flowControl.saturationDetector.pluginRef")
                path = "flowControl.saturationDetector.pluginRef"
        if top_ref is not None:
            name = self.name(top_ref, "saturationDetector.pluginRef")
            if ref is None:
                self.warnings.append(
                    "DEPRECATION: top-level saturationDetector.pluginRef is deprecated, use flowControl.saturationDetector"
                )
                ref, path = name, "saturationDetector.pluginRef"
            else:
                self.warnings.append(
                    "DEPRECATION: top-level saturationDetector.pluginRef is deprecated; flowControl.saturationDetector "
                    f"is set too, so it is used and saturationDetector.pluginRef ({name!r}) is not (as llm-d)"
                )
        return (ref or UtilizationDetector.type, path)

    # -- the whole -----------------------------------------------------------------------------------

    def band(self, raw: object, path: str, *, template: bool) -> BandConfig:
        spec = self.mapping(raw, path, _BAND_KEYS)
        priority = 0
        if template:
            if "priority" in spec:
                self.warnings.append(
                    f"{path}.priority: a template's priority is replaced by each request's; it is ignored (as llm-d)"
                )
        else:
            value = spec.get("priority")
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(f"{path}.priority", f"is required: an integer, got {shown(value)}")
            priority = value
        ordering_ref = spec.get("orderingPolicyRef")
        fairness_ref = spec.get("fairnessPolicyRef")
        if ordering_ref is not None:
            ordering = self.plugin("ordering policy", self.name(ordering_ref, f"{path}.orderingPolicyRef"), f"{path}.orderingPolicyRef")
        else:
            ordering = self.plugin("ordering policy", FcfsOrdering.type, None)
        if fairness_ref is not None:
            fairness = self.plugin("fairness policy", self.name(fairness_ref, f"{path}.fairnessPolicyRef"), f"{path}.fairnessPolicyRef")
        else:
            fairness = self.plugin("fairness policy", GlobalStrictFairness.type, None)
        return BandConfig(
            priority=priority,
            max_requests=self.quantity(spec, "maxRequests", path) or DEFAULT_BAND_MAX_REQUESTS,
            max_bytes=self.quantity(spec, "maxBytes", path) or DEFAULT_BAND_MAX_BYTES,
            fairness=fairness,
            ordering=ordering,
        )

    def resolve(self, section: Mapping[str, Any], detector_ref: tuple[str, str | None], enabled: bool,
                top: Mapping[str, Any]) -> FlowControlConfig:  # fmt: skip
        default_band = self.band(section.get("defaultPriorityBand") or {}, "flowControl.defaultPriorityBand", template=True)
        raw_negative = section.get("defaultNegativePriorityBand")
        negative = (
            default_band if raw_negative is None
            else self.band(raw_negative, "flowControl.defaultNegativePriorityBand", template=True)
        )  # fmt: skip
        raw_bands = section.get("priorityBands")
        if raw_bands is not None and not isinstance(raw_bands, list):
            raise self.error("flowControl.priorityBands", f"expected a list of bands, got {shown(raw_bands)}")
        bands: list[BandConfig] = []
        seen: dict[int, int] = {}
        for i, raw in enumerate(raw_bands or ()):
            path = f"flowControl.priorityBands[{i}]"
            b = self.band(raw, path, template=False)
            if b.priority in seen:
                raise self.error(f"{path}.priority", f"duplicate priority {b.priority} (also priorityBands[{seen[b.priority]}])")
            seen[b.priority] = i
            bands.append(b)
        bands.sort(key=lambda b: -b.priority)

        ttl = self.duration(section, "defaultRequestTTL")
        no_endpoint = self.duration(section, "noEndpointRequestTTL")
        if no_endpoint is None:
            no_endpoint = ttl if ttl is not None else DEFAULT_REQUEST_TTL  # follows defaultRequestTTL, as llm-d
        eviction = section.get("enableEviction", False)
        if not isinstance(eviction, bool):
            raise self.error("flowControl.enableEviction", f"expected true or false, got {shown(eviction)}")

        usage_ref = section.get("usageLimitPolicyPluginRef")
        if usage_ref is not None:
            usage = self.plugin("usage limit policy", self.name(usage_ref, "flowControl.usageLimitPolicyPluginRef"),
                                "flowControl.usageLimitPolicyPluginRef")  # fmt: skip
        else:
            usage = self.plugin("usage limit policy", StaticUsageLimit.type, None)
        detector = self.detector(detector_ref, top, enabled)
        eviction_filter = eviction_order = None
        if eviction:  # llm-d's evictor always uses these two; a declared instance is the same thing
            eviction_filter = self.plugin("eviction filter", self.first(SheddableEvictionFilter), None)
            eviction_order = self.plugin("eviction ordering", self.first(PriorityThenTimeEvictionOrder), None)
        return FlowControlConfig(
            enabled=enabled,
            bands=tuple(bands),
            default_band=default_band,
            default_negative_band=negative,
            max_requests=self.quantity(section, "maxRequests", "flowControl"),
            max_bytes=self.quantity(section, "maxBytes", "flowControl"),
            default_request_ttl=DEFAULT_REQUEST_TTL if ttl is None else ttl,
            no_endpoint_request_ttl=no_endpoint,
            saturation_detector=detector,
            usage_limit=usage,
            enable_eviction=eviction,
            eviction_filter=eviction_filter,
            eviction_order=eviction_order,
            fairness_id=self.fairness_resolver(),
        )

    def first(self, cls: type) -> str:
        """The name of the config's first plugin of `cls`, else its type (made when used)."""
        return next((n for n, q in self.plugins.items() if isinstance(q, cls)), cls.type)  # type: ignore[attr-defined]

    def detector(self, ref: tuple[str, str | None], top: Mapping[str, Any], enabled: bool) -> Any:
        """The detector, with the top-level thresholds as a utilization-detector's defaults."""
        name, path = ref
        thresholds = {k: top[k] for k in THRESHOLDS if top.get(k) is not None}
        if name == UtilizationDetector.type and name not in self.plugins and name not in self.made and thresholds:
            self.made[name] = self.make(name, _plugin_thresholds(thresholds, self.error))
        detector = self.plugin("saturation detector", name, path)
        if not thresholds or (not enabled and path is None):
            return detector
        if not isinstance(detector, UtilizationDetector):
            raise self.error(
                f"saturationDetector.{next(iter(thresholds))}",
                f"the top-level saturationDetector thresholds configure a utilization detector, but flow control's "
                f"detector is {shown(name)} ({detector.type}); remove them, or use a utilization-detector",
            )
        if name in self.plugins:
            self.adopt(detector, name, _plugin_thresholds(thresholds, self.error))
        return detector

    def adopt(self, detector: UtilizationDetector, name: str, values: Mapping[str, Any]) -> None:
        """A declared utilization-detector takes the top-level thresholds it leaves out; one it sets
        must agree."""
        probe = build_plugin(UtilizationDetector.type, name, values, self.ctx).plugin
        assert isinstance(probe, UtilizationDetector)
        effective = dict(self.parameters.get(name, {}))
        for key, attr in (("queueDepthThreshold", "queue_depth"), ("kvCacheUtilThreshold", "kv_cache_util"),
                          ("metricsStalenessThreshold", "staleness")):  # fmt: skip
            if key not in values:
                continue
            mine, theirs = getattr(detector, attr), getattr(probe, attr)
            if key not in detector.given:
                setattr(detector, attr, theirs)
                effective[key] = values[key]
            elif not math.isclose(mine, theirs):
                raise self.error(
                    f"saturationDetector.{key}",
                    f"{shown(values[key])} disagrees with {self.where(name)} ({name}).parameters.{key} "
                    f"({shown(self.parameters.get(name, {}).get(key))}); the EPP has one saturation signal: set it in one place",
                )
        self.parameters[name] = MappingProxyType(effective)

    def fairness_resolver(self) -> Callable[..., str]:
        agents = [n for n, q in self.plugins.items() if isinstance(q, AgentIdentity)]
        if len(agents) > 1:
            raise self.error(
                f"{self.where(agents[1])}.type",
                f"a second agent-identity plugin ({agents[0]!r} is the first); a request has one fairness id",
            )
        resolver = fairness_id_from_headers
        if agents:
            agent = self.plugins[agents[0]]
            assert isinstance(agent, AgentIdentity)
            resolver = agent.fairness_id
            self.used.add(agents[0])
        for q in self.plugins.values():
            if isinstance(q, ProgramAwareFairness):
                q.fairness_id = resolver  # its programs are the flows the runtime queues requests in
        return resolver

    def warn_unused(self, enabled: bool) -> None:
        for name, q in self.plugins.items():
            if not isinstance(q, FLOW_CONTROL_CLASSES) or (enabled and name in self.used) or q is self.admission_detector:
                continue
            if id(q) in self.in_profiles:
                continue  # a detector listed in a profile filters endpoints there
            why = f"the {GATE} feature gate is off" if not enabled else "the flowControl section does not use it"
            self.warnings.append(f"{self.where(name)} ({getattr(q, 'type', '?')}): does nothing: {why}")


def _plugin_thresholds(thresholds: Mapping[str, Any], error: Callable[[str | None, str], ConfigError]) -> dict[str, Any]:
    """The top-level thresholds as utilization-detector parameters (a number of seconds becomes a duration)."""
    out = dict(thresholds)
    q = out.get("queueDepthThreshold")
    if isinstance(q, float) and q.is_integer():
        out["queueDepthThreshold"] = int(q)
    s = out.get("metricsStalenessThreshold")
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        out["metricsStalenessThreshold"] = f"{s}s"
    elif isinstance(s, str) and parse_go_duration(s) is None:
        raise error("saturationDetector.metricsStalenessThreshold", f"expected a duration like 200ms or 2s, got {shown(s)}")
    return out
