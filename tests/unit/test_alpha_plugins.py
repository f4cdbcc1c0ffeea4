"""llm-d's utilization-filter (its formula, its config refused where a value would be wrong), the
deprecated by-label-selector, header-label-affinity-scorer and session-affinity-filter."""

from __future__ import annotations

import pytest

from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.framework.types import CycleState
from tests.unit.test_plugins import ep, plugin, req, scores

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: utilization-filter
  name: not-overloaded
  parameters:
    conditions: {conditions}
    fallbackOnEmpty: true
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: not-overloaded
  - pluginRef: queue-scorer
"""


def kept(endpoints, **parameters) -> list[str]:
    f = plugin("utilization-filter", **parameters)
    return [e.name for e in f.filter(req(), CycleState(), endpoints)]


def test_utilization_filter_keeps_endpoints_under_every_cap():
    pool = [ep(1, running=40, waiting=0, kv_usage=0.5), ep(2, running=41), ep(3, waiting=1), ep(4, kv_usage=0.81)]
    caps = [
        {"metric": "running-requests", "maxValue": 40},
        {"metric": "waiting-queue", "maxValue": 0},
        {"metric": "kv-cache-utilization", "maxValue": 0.8},
    ]
    assert kept(pool, conditions=caps) == ["pod-1"]  # a value equal to its cap passes


def test_utilization_filter_active_requests_are_the_epps_own_counts():
    busy, idle = ep(1), ep(2)
    busy.in_flight = 3
    assert kept([busy, idle], conditions=[{"metric": "active-requests", "maxValue": 2}]) == ["pod-2"]


def test_utilization_filter_falls_back_only_when_asked():
    pool = [ep(1, waiting=5), ep(2, waiting=7)]
    caps = [{"metric": "waiting-queue", "maxValue": 1}]
    assert kept(pool, conditions=caps) == []
    assert kept(pool, conditions=caps, fallbackOnEmpty=True) == ["pod-1", "pod-2"]


@pytest.mark.parametrize(
    ("conditions", "field", "says"),
    [
        ("[]", "conditions", "is required"),
        ("[{metric: gpu-temp, maxValue: 1}]", "conditions[0].metric", "expected one of active-requests"),
        ("[{metric: waiting-queue}]", "conditions[0].maxValue", "is required"),
        ("[{metric: waiting-queue, maxValue: -1}]", "conditions[0].maxValue", ">= 0"),
        ("[{metric: kv-cache-utilization, maxValue: 80}]", "conditions[0].maxValue", "at most 1"),
        ("[{metric: waiting-queue, maxValue: 1, max: 2}]", "conditions[0].max", "unknown field"),
    ],
)
def test_utilization_filter_bad_conditions_name_the_field(conditions, field, says):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG.format(conditions=conditions), "u.yaml")
    assert f"u.yaml: plugins[0].parameters.{field}: utilization-filter:" in str(e.value)
    assert says in str(e.value)


def test_utilization_filter_producer_name_must_resolve():
    text = CONFIG.format(conditions="[{metric: active-requests, maxValue: 4}]").replace(
        "    fallbackOnEmpty: true", "    inFlightLoadProducerName: queue-scorer"
    )
    with pytest.raises(ConfigError) as e:
        load_config(text, "u.yaml")
    assert "plugins[0].parameters.inFlightLoadProducerName" in str(e.value)
    assert "is not an inflight-load-producer" in str(e.value)


def test_utilization_filter_loads_in_a_profile():
    cfg = load_config(CONFIG.format(conditions="[{metric: waiting-queue, maxValue: 0}]"), "u.yaml")
    assert [f.name for f in cfg.profile.filters] == ["not-overloaded"]
    assert cfg.plugin_parameters["not-overloaded"]["fallbackOnEmpty"] is True


def test_by_label_selector_is_the_deprecated_name_of_label_selector_filter():
    text = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: by-label-selector
  name: gpus
  parameters: {matchLabels: {accelerator: h100}}
"""
    cfg = load_config(text, "old.yaml")
    gpus = cfg.plugins["gpus"]
    assert [e.name for e in gpus.filter(req(), CycleState(), [ep(1, {"accelerator": "h100"}), ep(2)])] == ["pod-1"]
    assert any("by-label-selector is deprecated, use label-selector-filter" in w for w in cfg.warnings)
def test_header_label_affinity_scores_the_matching_label():
    pool = [ep(1, {"zone": "a"}), ep(2, {"zone": "b"}), ep(3)]
    params = {"headerName": "X-Preferred-Zone", "labelKey": "zone"}
    assert scores("header-label-affinity-scorer", pool, req(headers={"x-preferred-zone": "b"}), **params) == [0.0, 1.0, 0.0]
    assert scores("header-label-affinity-scorer", pool, req(), **params) == [0.0, 0.0, 0.0]
    assert scores("header-label-affinity-scorer", pool, req(headers={"x-preferred-zone": ""}), **params) == [0.0, 0.0, 0.0]


def test_header_label_affinity_needs_both_names():
    with pytest.raises(ConfigError, match="labelKey"):
        plugin("header-label-affinity-scorer", headerName="x-zone")


def test_session_affinity_filter_keeps_only_the_sessions_endpoint():
    from pickers.framework.types import SchedulingResult
    from pickers.plugins.scorer.affinity.session_affinity import session_token

    f = plugin("session-affinity-filter")
    pool = [ep(1), ep(2), ep(3)]
    pinned = req(headers={"x-session-token": session_token(pool[1].address)})
    assert [e.name for e in f.filter(pinned, CycleState(), pool)] == ["pod-2"]
    for other in (req(), req(headers={"x-session-token": "%%%"}), pinned):
        pool_without = [pool[0], pool[2]] if other is pinned else pool
        assert f.filter(other, CycleState(), pool_without) == pool_without  # no preference: all pass
    result = SchedulingResult(endpoints=[pool[2]])
    f.pre_request(req(), CycleState(), result)
    assert result.response_headers["x-session-token"] == session_token(pool[2].address)


def test_session_affinity_filter_session_id_binds_then_pins_then_moves():
    from pickers.framework.types import SchedulingResult

    f = plugin("session-affinity-filter", strategy="session_id")
    pool = [ep(1), ep(2), ep(3)]
    r = req(headers={"x-session-id": "conv-7"})
    assert f.filter(r, CycleState(), pool) == pool  # unbound: all pass
    f.pre_request(r, CycleState(), SchedulingResult(endpoints=[pool[0]]))
    assert f.filter(r, CycleState(), pool) == [pool[0]]
    cycle = CycleState()
    assert f.filter(r, cycle, pool[1:]) == pool[1:]  # its endpoint left: all pass, and the session moves
    f.pre_request(r, cycle, SchedulingResult(endpoints=[pool[2]]))
    assert f.filter(r, CycleState(), pool) == [pool[2]]
