"""The flowControl section and gate (pickers/config/flowcontrol.py): shapes, quantities, durations,
llm-d's defaults, references, the top-level saturationDetector, and what `epp check-config` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.cli import main as cli
from pickers.config.flowcontrol import parse_quantity
from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.framework.flowcontrol import DEFAULT_FLOW_ID, fairness_id_from_headers
from pickers.framework.request import InferenceRequest
from pickers.plugins.flowcontrol.agent_identity import AgentIdentity
from pickers.plugins.flowcontrol.detectors import (
    ConcurrencyDetector,
    UtilizationDetector,
)
from pickers.plugins.flowcontrol.fairness import (
    GlobalStrictFairness,
    RoundRobinFairness,
)
from pickers.plugins.flowcontrol.ordering import EdfOrdering, FcfsOrdering, SloDeadlineOrdering
from pickers.plugins.flowcontrol.program_aware import ProgramAwareFairness
from pickers.plugins.flowcontrol.usage_limits import StaticUsageLimit

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
ON = "featureGates: [flowControl]\n"
SCORER = "- type: queue-scorer\n"


def load(body: str):
    return load_config(HEAD + body, "fc.yaml")


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def test_the_gate_alone_gives_llm_ds_defaults():
    fc = load(ON + "plugins:\n" + SCORER).flow_control
    assert fc is not None and fc.enabled and fc.bands == ()
    b = fc.default_band
    assert (b.max_requests, b.max_bytes) == (5000, 1_000_000_000)
    assert isinstance(b.fairness, GlobalStrictFairness) and isinstance(b.ordering, FcfsOrdering)
    assert fc.default_negative_band is fc.default_band
    assert (fc.max_requests, fc.max_bytes, fc.default_request_ttl, fc.no_endpoint_request_ttl) == (0, 0, 60.0, 60.0)
    assert isinstance(fc.saturation_detector, UtilizationDetector) and fc.saturation_detector.staleness == pytest.approx(0.2)
    assert isinstance(fc.usage_limit, StaticUsageLimit) and fc.usage_limit.threshold == 1.0
    assert (fc.enable_eviction, fc.eviction_filter, fc.eviction_order) == (False, None, None)
    assert fc.fairness_id is fairness_id_from_headers


def test_made_defaults_join_the_plugins_and_show_in_check_config():
    cfg = load(ON + "plugins:\n" + SCORER)
    assert {"fcfs-ordering-policy", "global-strict-fairness-policy", "static-usage-limit-policy", "utilization-detector"} <= set(cfg.plugin_types)
    assert cfg.plugin_parameters["utilization-detector"]["metricsStalenessThreshold"] == "200ms"
    assert cfg.warnings == ()


def test_gate_off_gives_no_flow_control_and_makes_nothing():
    cfg = load("plugins:\n" + SCORER)
    assert cfg.flow_control is None and set(cfg.plugin_types) == {"queue-scorer"}
    assert load("featureGates: [flowControl=false]\nplugins:\n" + SCORER).flow_control is None
    assert load("featureGates: [flowControl, flowControl=false]\nplugins:\n" + SCORER).flow_control is None  # the last wins


def test_gate_off_section_is_checked_and_loads_with_a_warning():
    cfg = load("plugins:\n" + SCORER + "flowControl:\n  maxRequests: 10\n")
    assert cfg.flow_control is None
    assert any("flowControl.maxRequests: the flowControl section is set but the flowControl feature gate is off" in w for w in cfg.warnings)
    assert "flowControl.maxBytes: expected a Kubernetes quantity" in error_of("plugins:\n" + SCORER + "flowControl: {maxBytes: []}\n")


def test_gate_off_plugins_load_with_a_warning_that_they_do_nothing():
    cfg = load("plugins:\n" + SCORER + "- type: round-robin-fairness-policy\n- type: agent-identity\n")
    assert "plugins[1] (round-robin-fairness-policy): does nothing: the flowControl feature gate is off" in cfg.warnings
    assert "plugins[2] (agent-identity): does nothing: the flowControl feature gate is off" in cfg.warnings


def test_a_detector_listed_in_a_profile_filters_there_without_a_warning():
    body = "plugins:\n" + SCORER + "- type: utilization-detector\nschedulingProfiles:\n- name: default\n  plugins:\n" \
           "  - pluginRef: utilization-detector\n  - pluginRef: queue-scorer\n"  # fmt: skip
    cfg = load(body)
    assert cfg.warnings == () and isinstance(cfg.profile.filters[0], UtilizationDetector)


def test_unused_flow_control_plugins_warn_with_the_gate_on():
    cfg = load(ON + "plugins:\n" + SCORER + "- type: edf-ordering-policy\n")
    assert "plugins[1] (edf-ordering-policy): does nothing: the flowControl section does not use it" in cfg.warnings


def test_fairness_policies_are_not_pickers():
    cfg = load(ON + "plugins:\n" + SCORER + "- type: round-robin-fairness-policy\n"
               "flowControl:\n  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n")  # fmt: skip
    assert cfg.profile.picker.type == "max-score-picker"
    assert isinstance(cfg.flow_control.default_band.fairness, RoundRobinFairness)


def test_bands_resolve_their_policies_and_limits():
    body = ON + "plugins:\n" + SCORER + "- type: edf-ordering-policy\n  name: deadline\n- type: round-robin-fairness-policy\n" \
        "flowControl:\n  priorityBands:\n  - {priority: -5, maxBytes: 1Mi}\n" \
        "  - {priority: 100, maxRequests: 1k, orderingPolicyRef: deadline, fairnessPolicyRef: round-robin-fairness-policy}\n"  # fmt: skip
    fc = load(body).flow_control
    assert [b.priority for b in fc.bands] == [100, -5]  # priority descending
    high, low = fc.bands
    assert (high.max_requests, high.max_bytes, type(high.ordering), type(high.fairness)) == (1000, 1_000_000_000, EdfOrdering, RoundRobinFairness)
    assert (low.max_requests, low.max_bytes, type(low.fairness)) == (5000, 1 << 20, GlobalStrictFairness)
    assert fc.band(100) is high
    assert fc.band(7).priority == 7 and fc.band(7).max_requests == 5000


def test_a_band_leaving_a_policy_out_gets_the_system_default_not_the_default_bands():
    body = ON + "plugins:\n" + SCORER + "- type: round-robin-fairness-policy\nflowControl:\n" \
        "  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n  priorityBands: [{priority: 1}]\n"  # fmt: skip
    fc = load(body).flow_control
    assert isinstance(fc.bands[0].fairness, GlobalStrictFairness)
    assert isinstance(fc.band(-1).fairness, RoundRobinFairness)  # no negative template: the default one


def test_ttls_follow_llm_d():
    fc = load(ON + "plugins:\n" + SCORER + "flowControl: {defaultRequestTTL: 1m30s}\n").flow_control
    assert (fc.default_request_ttl, fc.no_endpoint_request_ttl) == (90.0, 90.0)  # the no-endpoint budget follows
    fc = load(ON + "plugins:\n" + SCORER + "flowControl: {defaultRequestTTL: 0s, noEndpointRequestTTL: 5m}\n").flow_control
    assert (fc.default_request_ttl, fc.no_endpoint_request_ttl) == (0.0, 300.0)


@pytest.mark.parametrize(
    "section, field, fragment",
    [
        ("{maxBytes: 1Qi}", "flowControl.maxBytes", "expected a Kubernetes quantity"),
        ("{maxRequests: -1}", "flowControl.maxRequests", "must be non-negative"),
        ("{defaultRequestTTL: 30}", "flowControl.defaultRequestTTL", "expected a duration"),
        ("{noEndpointRequestTTL: -1s}", "flowControl.noEndpointRequestTTL", "must not be negative"),
        ("{enableEviction: yes-please}", "flowControl.enableEviction", "expected true or false"),
        ("{maxRequest: 5}", "flowControl.maxRequest", "unknown field"),
        ("{priorityBands: {priority: 1}}", "flowControl.priorityBands", "expected a list"),
        ("{priorityBands: [{priority: 1}, {priority: 2, maxBytes: lots}]}", "flowControl.priorityBands[1].maxBytes", "quantity"),
        ("{priorityBands: [{maxBytes: 1}]}", "flowControl.priorityBands[0].priority", "is required"),
        ("{priorityBands: [{priority: 1}, {priority: 1}]}", "flowControl.priorityBands[1].priority", "duplicate priority 1"),
        ("{priorityBands: [{priority: 1, fairness: x}]}", "flowControl.priorityBands[0].fairness", "unknown field"),
        ("{priorityBands: [{priority: 1, orderingPolicyRef: nope}]}", "flowControl.priorityBands[0].orderingPolicyRef", "no plugin named 'nope'"),
        ("{defaultPriorityBand: {fairnessPolicyRef: queue-scorer}}", "flowControl.defaultPriorityBand.fairnessPolicyRef", "is not a fairness policy"),
        ("{usageLimitPolicyPluginRef: gone}", "flowControl.usageLimitPolicyPluginRef", "no plugin named 'gone'"),
        ("{saturationDetector: {pluginRef: queue-scorer}}", "flowControl.saturationDetector.pluginRef", "is not a saturation detector"),
        ("{saturationDetector: {plugin: x}}", "flowControl.saturationDetector.plugin", "unknown field"),
        ("[]", "flowControl", "expected a mapping"),
    ],
)
def test_bad_sections_are_refused_naming_the_field(section, field, fragment):
    msg = error_of(ON + "plugins:\n" + SCORER + f"flowControl: {section}\n")
    assert msg.startswith(f"fc.yaml: {field}: ") and fragment in msg, msg


def test_a_template_priority_loads_with_a_warning():
    cfg = load(ON + "plugins:\n" + SCORER + "flowControl: {defaultPriorityBand: {priority: 3}}\n")
    assert any(w.startswith("flowControl.defaultPriorityBand.priority: a template's priority is replaced") for w in cfg.warnings)


@pytest.mark.parametrize(
    "text, value",
    [(100, 100), ("100", 100), ("1k", 1000), ("1Ki", 1024), ("2Gi", 2 << 30), ("1G", 10**9), ("1.5", 2), ("500m", 1),
     ("1e3", 1000), ("0", 0), (2.5, 3)],
)  # fmt: skip
def test_quantities_are_kubernetes_quantities(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "k", "1kk", "1 Gi", "1gi", True, None, [], "1.2.3"])
def test_malformed_quantities(text):
    assert parse_quantity(text) is None


def test_eviction_uses_llm_ds_filter_and_order():
    fc = load(ON + "plugins:\n" + SCORER + "flowControl: {enableEviction: true}\n").flow_control
    assert fc.eviction_filter.type == "sheddable-eviction-filter"
    assert fc.eviction_order.type == "priority-then-time-eviction-order-policy"


def test_the_detector_can_be_a_declared_concurrency_detector():
    fc = load(ON + "plugins:\n" + SCORER + "- type: concurrency-detector\n  name: cd\n  parameters: {maxConcurrency: 8}\n"
              "flowControl: {saturationDetector: {pluginRef: cd}}\n").flow_control  # fmt: skip
    assert isinstance(fc.saturation_detector, ConcurrencyDetector) and fc.saturation_detector.max_concurrency == 8


def test_concurrency_detector_must_name_an_inflight_load_producer():
    msg = error_of("plugins:\n" + SCORER + "- type: concurrency-detector\n  parameters: {inFlightLoadProducerName: queue-scorer}\n")
    assert "plugins[1].parameters.inFlightLoadProducerName" in msg and "not an inflight-load-producer" in msg


# -- the top-level saturationDetector ------------------------------------------------------------


def test_top_level_thresholds_are_the_made_detectors_defaults():
    cfg = load(ON + "plugins:\n" + SCORER + "saturationDetector: {queueDepthThreshold: 3, kvCacheUtilThreshold: 0.9, metricsStalenessThreshold: 2s}\n")
    d = cfg.flow_control.saturation_detector
    assert (d.queue_depth, d.kv_cache_util, d.staleness) == (3, 0.9, 2.0)
    assert cfg.saturation_detector == {"queueDepthThreshold": 3, "kvCacheUtilThreshold": 0.9, "metricsStalenessThreshold": "2s"}


def test_a_declared_utilization_detector_adopts_thresholds_it_leaves_out():
    cfg = load(ON + "plugins:\n" + SCORER + "- type: utilization-detector\n  parameters: {queueDepthThreshold: 3}\n"
               "saturationDetector: {queueDepthThreshold: 3, kvCacheUtilThreshold: 0.5}\n")  # fmt: skip
    d = cfg.flow_control.saturation_detector
    assert (d.queue_depth, d.kv_cache_util) == (3, 0.5)
    assert cfg.plugin_parameters["utilization-detector"]["kvCacheUtilThreshold"] == 0.5


def test_conflicting_thresholds_are_refused():
    msg = error_of(ON + "plugins:\n" + SCORER + "- type: utilization-detector\n  parameters: {queueDepthThreshold: 5}\n"
                   "saturationDetector: {queueDepthThreshold: 3}\n")  # fmt: skip
    assert msg.startswith("fc.yaml: saturationDetector.queueDepthThreshold: 3 disagrees with plugins[1] (utilization-detector)")


def test_thresholds_with_a_concurrency_detector_are_refused():
    msg = error_of(ON + "plugins:\n" + SCORER + "- type: concurrency-detector\nsaturationDetector: {queueDepthThreshold: 3}\n"
                   "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}\n")  # fmt: skip
    assert "saturationDetector.queueDepthThreshold: the top-level saturationDetector thresholds configure a utilization detector" in msg


def test_a_threshold_the_detector_cannot_take_is_refused_at_the_top_level_field():
    msg = error_of(ON + "plugins:\n" + SCORER + "saturationDetector: {kvCacheUtilThreshold: 1.5}\n")
    assert msg.startswith("fc.yaml: saturationDetector.kvCacheUtilThreshold: utilization-detector: expected a number in (0.0, 1.0]")


def test_top_level_plugin_ref_is_llm_ds_deprecated_spelling_with_the_gate_on():
    cfg = load(ON + "plugins:\n" + SCORER + "- type: concurrency-detector\n  name: cd\nsaturationDetector: {pluginRef: cd}\n")
    assert isinstance(cfg.flow_control.saturation_detector, ConcurrencyDetector)
    assert "DEPRECATION: top-level saturationDetector.pluginRef is deprecated, use flowControl.saturationDetector" in cfg.warnings
    assert cfg.saturation_detector == {}


def test_a_detector_reference_without_the_gate_is_the_admission_detector():
    """llm-d's legacy admission: without flow control, the named detector says when sheddable requests
    are refused; the thresholds of a made utilization-detector come from the top-level section."""
    cfg = load("plugins:\n" + SCORER + "- type: concurrency-detector\n  name: cd\n"
               "flowControl: {saturationDetector: {pluginRef: cd}}\n")  # fmt: skip
    assert cfg.flow_control is None and cfg.admission_detector is cfg.plugins["cd"]
    assert not any("cd" in w and "does nothing" in w for w in cfg.warnings)
    made = load("plugins:\n" + SCORER + "flowControl: {saturationDetector: {pluginRef: utilization-detector}}\n"
                "saturationDetector: {queueDepthThreshold: 7}\n")  # fmt: skip
    assert isinstance(made.admission_detector, UtilizationDetector) and made.admission_detector.queue_depth == 7
    assert load("plugins:\n" + SCORER).admission_detector is None


# -- fairness ids ------------------------------------------------------------------------------


def test_agent_identity_becomes_the_fairness_id_resolver_of_flow_control_and_program_aware():
    cfg = load(ON + "plugins:\n" + SCORER + "- type: agent-identity\n- type: program-aware-fairness\n"
               "flowControl: {defaultPriorityBand: {fairnessPolicyRef: program-aware-fairness}}\n")  # fmt: skip
    fc = cfg.flow_control
    agent = cfg.plugins["agent-identity"]
    assert isinstance(agent, AgentIdentity) and fc.fairness_id == agent.fairness_id
    program = cfg.plugins["program-aware-fairness"]
    assert isinstance(program, ProgramAwareFairness) and program.fairness_id == agent.fairness_id
    req = InferenceRequest("r", "/v1/completions", {"session-id": "s1"})
    assert fc.fairness_id(req) == "s1"
    assert fc.fairness_id(InferenceRequest("r", "/v1/completions", {})) == DEFAULT_FLOW_ID
    assert program in cfg.producers  # it hears of dispatches and completions
    assert cfg.warnings == ()


def test_two_agent_identities_are_refused():
    msg = error_of(ON + "plugins:\n" + SCORER + "- type: agent-identity\n- type: agent-identity\n  name: second\n")
    assert "plugins[2].type: a second agent-identity plugin" in msg


def test_slo_deadline_ordering_loads_as_a_bands_ordering():
    body = ON + "plugins:\n" + SCORER + "- type: slo-deadline-ordering-policy\nflowControl:\n  priorityBands:\n" \
        "  - {priority: 0, orderingPolicyRef: slo-deadline-ordering-policy}\n"
    band = load(body).flow_control.bands[0]
    assert isinstance(band.ordering, SloDeadlineOrdering)


class _Item:
    def __init__(self, received_at: float, headers: dict[str, str]) -> None:
        self.received_at = received_at
        self.request = InferenceRequest("r", "/v1/completions", headers)


@pytest.mark.parametrize(
    ("headers", "deadline"),
    [
        ({"x-llm-d-slo-ttft-ms": "250"}, 10.25),
        ({"x-slo-ttft-ms": "1000"}, 11.0),  # the deprecated alias
        ({"x-llm-d-slo-ttft-ms": " 40 "}, 10.04),
        ({"x-llm-d-slo-ttft-ms": "0"}, 10.0),
        ({}, float("inf")),
        ({"x-llm-d-slo-ttft-ms": "2.5"}, float("inf")),  # a whole number of ms, as llm-d parses it
        ({"x-llm-d-slo-ttft-ms": "-5"}, float("inf")),
        ({"x-llm-d-slo-ttft-ms": "soon"}, float("inf")),
    ],
)
def test_slo_deadline_orders_by_arrival_plus_the_ttft_slo(headers, deadline):
    key = SloDeadlineOrdering().key(_Item(10.0, headers))  # type: ignore[arg-type]
    assert key[0] == pytest.approx(deadline) and key[1] == 10.0


# -- epp check-config ------------------------------------------------------------------------------


def test_check_config_prints_the_flow_control_settings(tmp_path: Path, capsys):
    path = tmp_path / "fc.yaml"
    path.write_text(HEAD + ON + "plugins:\n" + SCORER + "- type: agent-identity\nflowControl:\n  maxRequests: 1k\n"
                    "  enableEviction: true\n  priorityBands: [{priority: 10, maxBytes: 1Mi}]\n")  # fmt: skip
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  flowControl:\n    maxRequests: 1000, maxBytes: unlimited\n    defaultRequestTTL: 60s, noEndpointRequestTTL: 60s\n" in out
    assert "    saturationDetector: utilization-detector (utilization-detector)\n" in out
    assert "    enableEviction: true (filter sheddable-eviction-filter, order priority-then-time-eviction-order-policy)\n" in out
    assert "    fairness id: explicit header, then agent-identity session headers, then default-flow\n" in out
    assert "    band 10: maxRequests=5000, maxBytes=1048576, fairness=global-strict-fairness-policy, ordering=fcfs-ordering-policy\n" in out
