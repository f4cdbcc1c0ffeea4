"""`epp check-config FILE...`: load each EndpointPickerConfig as `epp serve` would, without serving, and
print what it means: the profile handler, the screeners, each profile's filters, weighted scorers and picker, the
token-producers when a plugin implies one, the data layer when it is not the default one, the request parsers
and the paths each claims, every plugin with the parameters it runs with (defaults filled in), and any deprecation.

Exit 0 when every file is valid, 2 when one is not (its message on stderr, naming the file and field).
`-` reads the config from standard input. Made for CI on the repositories that hold the configs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from extproc.handlers.parsers import claimed_paths
from extproc.requestcontrol.saturation import SaturationConfig
from pickers.config import safe_yaml
from pickers.config.datalayer import DEFAULT_DATA_LAYER
from pickers.config.loader import EndpointPickerConfig, load_config, load_config_file
from pickers.framework.errors import ConfigError
from pickers.framework.flowcontrol import BandConfig, FlowControlConfig
from pickers.framework.types import Screener
from pickers.plugins.producer.tokens import TokenProducer

STDIN = "-"


def check_config(paths: list[str], out: TextIO | None = None, err: TextIO | None = None, *, allow_experimental: bool = False) -> int:
    """`allow_experimental`: --allow-experimental-plugins, as `epp serve` would be given it."""
    out = out or sys.stdout
    err = err or sys.stderr
    status = 0
    for path in paths:
        try:
            cfg = _load(path, allow_experimental)
            SaturationConfig.from_config(cfg.saturation_detector, cfg.source)  # as epp serve reads it
        except ConfigError as e:
            print(f"epp: configuration error: {e}", file=err)
            status = 2
            continue
        out.write(describe(cfg))
    return status


def _load(path: str, allow_experimental: bool) -> EndpointPickerConfig:
    if path != STDIN:
        return load_config_file(path, allow_experimental=allow_experimental)
    data = sys.stdin.buffer.read(safe_yaml.MAX_FILE_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 (byte {e.start})", source="<stdin>") from None
    return load_config(text, "<stdin>", allow_experimental=allow_experimental)  # the parser refuses more than MAX_FILE_BYTES


def describe(cfg: EndpointPickerConfig) -> str:
    lines = [f"{cfg.source}: valid ({cfg.api_version})"]
    lines += [f"  warning: {w}" for w in cfg.warnings]
    if cfg.feature_gates:
        lines.append(f"  featureGates: {', '.join(cfg.feature_gates)}")
    if cfg.saturation_detector:
        lines.append(f"  saturationDetector: {_value(cfg.saturation_detector)}")
    if cfg.flow_control is not None:
        lines += _flow_control(cfg.flow_control)
    lines.append(f"  profile handler: {cfg.profile_handler.type}")
    screeners = [p.name for p in cfg.producers if isinstance(p, Screener)]
    if screeners:
        lines.append(f"  screeners (narrow every profile's candidates first): {', '.join(screeners)}")
    for profile in cfg.profiles:
        lines.append(f"  profile {profile.name}:")
        if profile.filters:
            lines.append(f"    filters: {', '.join(f.name for f in profile.filters)}")
        if profile.scorers:
            lines.append(f"    scorers: {', '.join(f'{w.scorer.name} x{w.weight:g}' for w in profile.scorers)}")
        implied = "" if profile.picker.name in cfg.plugins else " (implied)"
        lines.append(f"    picker: {profile.picker.name}{implied}")
    tokens = [p for p in cfg.producers if isinstance(p, TokenProducer)]
    if any(p.name not in cfg.plugins for p in tokens):  # a plugin brings one (the old precise scorer's tokenizer pool)
        named = ", ".join(p.name + ("" if p.name in cfg.plugins else " (implied)") for p in tokens)
        lines.append(f"  token producers, each asked in turn for what those before gave no ids: {named}")
    if cfg.data_layer != DEFAULT_DATA_LAYER:
        lines.append("  dataLayer:")
        lines += [f"    {line}" for line in cfg.data_layer.summary()]
    default = " (the default list)" if cfg.default_parsers else ""
    lines.append(f"  request parsers{default}:")
    for spec in cfg.parsers:
        label = spec.name if spec.name == spec.type else f"{spec.name} ({spec.type})"
        paths = claimed_paths(spec.type)
        lines.append(f"    {label}: " + (", ".join(paths) if paths else "every path no other parser claims, unread"))
    lines.append("  plugins:")
    for name, type_name in cfg.plugin_types.items():
        label = name if name == type_name else f"{name} ({type_name})"
        params = cfg.plugin_parameters.get(name, {})
        lines.append(f"    {label}" + (f": {_params(params)}" if params else ""))
    return "\n".join(lines) + "\n"


def _flow_control(fc: FlowControlConfig) -> list[str]:
    def band(b: BandConfig) -> str:
        return (f"maxRequests={b.max_requests}, maxBytes={b.max_bytes}, fairness={b.fairness.name}, "
                f"ordering={b.ordering.name}")  # fmt: skip

    def limit(n: int) -> str:
        return str(n) if n else "unlimited"

    resolver = getattr(fc.fairness_id, "__self__", None)  # agent-identity's bound method, else the header function
    lines = [
        "  flowControl:",
        f"    maxRequests: {limit(fc.max_requests)}, maxBytes: {limit(fc.max_bytes)}",
        f"    defaultRequestTTL: {_seconds(fc.default_request_ttl)}, noEndpointRequestTTL: {_seconds(fc.no_endpoint_request_ttl)}",
        f"    saturationDetector: {fc.saturation_detector.name} ({fc.saturation_detector.type})",
        f"    usageLimitPolicy: {fc.usage_limit.name} ({fc.usage_limit.type})",
        f"    enableEviction: {_value(fc.enable_eviction)}"
        + (f" (filter {fc.eviction_filter.name}, order {fc.eviction_order.name})" if fc.eviction_filter and fc.eviction_order else ""),
        "    fairness id: explicit header" + (f", then {resolver.name} session headers" if resolver is not None else "")
        + ", then default-flow",
    ]
    lines += [f"    band {b.priority}: {band(b)}" for b in fc.bands]
    lines.append(f"    defaultPriorityBand: {band(fc.default_band)}")
    if fc.default_negative_band is not fc.default_band:
        lines.append(f"    defaultNegativePriorityBand: {band(fc.default_negative_band)}")
    return lines


def _seconds(s: float) -> str:
    return "no limit" if s == 0 else f"{s:g}s"


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in params.items())


def _value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, (bool, dict, list)) or isinstance(v, Mapping):
        return json.dumps(v if not isinstance(v, Mapping) else dict(v), separators=(",", ":"))
    if v == sys.maxsize:
        return "unlimited"
    return str(v)
