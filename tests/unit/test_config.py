"""EndpointPickerConfig loading: defaults as the reference picker has them, and errors that name the
source, the field path and what was expected."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.server.runner import EppServer, ServeOptions
from pickers.config.loader import DEFAULT_CONFIG_TEXT, load_config, load_config_file
from pickers.config.registry import known_types
from pickers.config.strategies import STRATEGIES, build_profile
from pickers.framework.errors import ConfigError
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.picker.max_score import MaxScorePicker
from pickers.plugins.profile.handlers import SingleProfileHandler

HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
BEST = Path(__file__).resolve().parents[2] / "pickers" / "configs" / "best.yaml"
WEIGHTED = BEST.with_name("weighted.yaml")


def load(body: str, source: str = "test.yaml"):
    return load_config(HEADER + body, source)


def error_of(body: str, source: str = "test.yaml") -> str:
    with pytest.raises(ConfigError) as e:
        load(body, source)
    return str(e.value)


def shape(profile):
    return (
        profile.name,
        [f.type for f in profile.filters],
        [(w.scorer.type, w.weight) for w in profile.scorers],
        profile.picker.type,
    )


# -- defaults --------------------------------------------------------------------------------


def test_default_config_is_queue2_kv2_prefix3_max_score():
    cfg = load_config(DEFAULT_CONFIG_TEXT, "built-in")
    assert shape(cfg.profile) == (
        "default",
        [],
        [("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)],
        "max-score-picker",
    )


def test_strategy_default_is_the_default_config():
    from_strategy = build_profile("default", ApproxPrefixIndex())
    assert shape(from_strategy) == shape(load_config(DEFAULT_CONFIG_TEXT, "built-in").profile)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds(strategy):
    assert build_profile(strategy, ApproxPrefixIndex(), max_endpoints=2).picker.max_endpoints == 2


def test_no_profiles_means_one_default_profile_with_every_plugin_weight_1():
    cfg = load("plugins:\n- type: decode-filter\n- type: queue-scorer\n- type: lora-affinity-scorer\n")
    assert shape(cfg.profile) == (
        "default",
        ["decode-filter"],
        [("queue-scorer", 1.0), ("lora-affinity-scorer", 1.0)],
        "max-score-picker",
    )


def test_a_profile_without_picker_gets_max_score_picker():
    cfg = load("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n")
    assert isinstance(cfg.profile.picker, MaxScorePicker)
    assert cfg.profile.picker.max_endpoints == 1


def test_one_profile_gets_single_profile_handler():
    cfg = load("plugins:\n- type: queue-scorer\n")
    assert isinstance(cfg.profile_handler, SingleProfileHandler)


def test_plugin_name_defaults_to_type_and_names_allow_two_instances():
    cfg = load(
        "plugins:\n- type: queue-scorer\n- name: q2\n  type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n"
        "  - pluginRef: queue-scorer\n  - pluginRef: q2\n    weight: 0.5\n"
    )
    assert list(cfg.plugins) == ["queue-scorer", "q2"]
    assert [(w.scorer.name, w.weight) for w in cfg.profile.scorers] == [("queue-scorer", 1.0), ("q2", 0.5)]


@pytest.mark.parametrize("version", ["llm-d.ai/v1", "llm-d.ai/v1alpha1"])
def test_llm_d_api_versions_load_without_warnings(version):
    cfg = load_config(f"apiVersion: {version}\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n", "x")
    assert cfg.api_version == version
    assert cfg.warnings == ()


def test_the_gie_api_version_loads_with_one_deprecation_warning_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="pickers.config.loader"):
        cfg = load("plugins:\n- type: queue-scorer\n")
    assert cfg.warnings == (
        "DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated; use llm-d.ai/v1alpha1",
    )
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["test.yaml: DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated; use llm-d.ai/v1alpha1"]


def test_saturation_detector_is_stored():
    cfg = load("saturationDetector: {queueDepthThreshold: 5}\nplugins:\n- type: queue-scorer\n")
    assert cfg.saturation_detector == {"queueDepthThreshold": 5}


def test_feature_gate_flow_control_loads_and_turns_flow_control_on():
    cfg = load("featureGates: [flowControl]\nplugins:\n- type: queue-scorer\n")
    assert cfg.flow_control is not None and cfg.flow_control.enabled


@pytest.mark.parametrize("gate", ["flowControl=false", "haPopulateNonLeaderDatastore", "haPopulateNonLeaderDatastore=true", "prepareDataPlugins"])
def test_feature_gates_whose_setting_is_what_llm_epp_does_load(gate):
    assert load(f"featureGates: ['{gate}']\nplugins:\n- type: queue-scorer\n").feature_gates == (gate,)


def test_turning_off_a_gate_llm_epp_cannot_turn_off_is_refused():
    msg = error_of("featureGates: [haPopulateNonLeaderDatastore=false]\nplugins:\n- type: queue-scorer\n")
    assert "featureGates[0]: haPopulateNonLeaderDatastore=false is not supported" in msg


def test_unknown_and_malformed_feature_gates_are_refused():
    assert "featureGates[1]: unknown feature gate 'fastPath'" in error_of(
        "featureGates: [prepareDataPlugins, fastPath]\nplugins:\n- type: queue-scorer\n"
    )
    assert "featureGates[0]: expected flowControl=true or flowControl=false" in error_of(
        "featureGates: [flowControl=maybe]\nplugins:\n- type: queue-scorer\n"
    )


def test_a_flow_control_section_without_the_gate_loads_with_a_warning():
    cfg = load("flowControl:\n  defaultRequestTTL: 30s\nplugins:\n- type: queue-scorer\n")
    assert cfg.flow_control is None
    assert any(w.startswith("flowControl.defaultRequestTTL: the flowControl section is set but the flowControl feature gate is off") for w in cfg.warnings)


def test_an_empty_flow_control_section_sets_nothing_and_loads():
    assert load("flowControl: {}\nplugins:\n- type: queue-scorer\n").plugin_types == {"queue-scorer": "queue-scorer"}


def test_effective_parameters_have_the_defaults_filled_in():
    cfg = load("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 32}\n- type: max-score-picker\n")
    assert cfg.plugin_parameters["prefix-cache-scorer"] == {
        "blockSize": 32,
        "maxPrefixBlocksToMatch": 256,
        "lruCapacityPerServer": 31250,
        "autoTune": True,
        "prefixMatchInfoProducerName": None,
        "matchLengthWeight": 0.0,
        "matchLengthScaleTokens": 8192,
    }
    assert cfg.plugin_parameters["max-score-picker"] == {"maxNumOfEndpoints": 1}


def test_picker_max_num_of_endpoints_defaults_to_the_context_value():
    ctx = PluginContext(max_endpoints=3)
    cfg = load_config(HEADER + "plugins:\n- type: random-picker\n", "x", ctx)
    assert cfg.profile.picker.max_endpoints == 3
    cfg = load_config(HEADER + "plugins:\n- type: random-picker\n  parameters: {maxNumOfEndpoints: 2}\n", "x", ctx)
    assert cfg.profile.picker.max_endpoints == 2


def test_plugins_share_the_context_prefix_index_and_rng():
    ctx = PluginContext(rng=random.Random(1))
    cfg = load_config(DEFAULT_CONFIG_TEXT, "x", ctx)
    assert cfg.plugins["prefix-cache-scorer"].index is ctx.prefix_index
    assert cfg.profile.picker.rng is ctx.rng


def test_best_config_is_the_latency_models_cost_with_its_documented_slowdown_weight():
    cfg = load_config_file(BEST)
    [w] = cfg.profile.scorers
    assert (w.scorer.type, w.weight, w.scorer.slowdown_weight) == ("latency-cost-scorer", 1.0, 0.3)
    assert {type(q).__name__ for q in cfg.producers} >= {"InFlightLoadProducer", "PredictedLatencyProducer"}
    assert cfg.plugins["approx-prefix-cache-producer"].max_blocks == 131_072 // 64  # the whole prompt


def test_weighted_config_loads_with_its_documented_weights():
    cfg = load_config_file(WEIGHTED)
    scorers = {w.scorer.type: w.weight for w in cfg.profile.scorers}
    assert scorers == {
        "prefix-cache-scorer": 4.0,
        "active-request-scorer": 5.0,
        "queue-scorer": 1.0,
        "kv-cache-utilization-scorer": 1.0,
        "no-hit-lru-scorer": 1.0,
    }
    active = next(w.scorer for w in cfg.profile.scorers if w.scorer.type == "active-request-scorer")
    assert active.max_requests == 32


# -- errors ----------------------------------------------------------------------------------


def test_unknown_plugin_type_lists_the_known_ones():
    msg = error_of("plugins:\n- type: queue-scorer\n- type: queue-scorr\n")
    assert msg.startswith("test.yaml: plugins[1].type: unknown plugin type 'queue-scorr'")
    assert all(t in msg for t in known_types())


def test_bad_parameter_names_the_field_path():
    msg = error_of("plugins:\n- type: load-aware-scorer\n  parameters:\n    threshold: many\n")
    assert msg.startswith("test.yaml: plugins[0].parameters.threshold: load-aware-scorer: expected an integer")


def test_unknown_parameter_is_an_error():
    msg = error_of("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 64, lruCapacity: 5}\n")
    assert "plugins[0].parameters.lruCapacity" in msg and "lruCapacityPerServer" in msg


def test_missing_required_parameter():
    msg = error_of("plugins:\n- type: by-label\n  parameters: {validValues: [a]}\n")
    assert "plugins[0].parameters.label" in msg and "required" in msg


def test_dangling_plugin_ref():
    msg = error_of(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n"
        "  - pluginRef: queue-scorer\n  - pluginRef: kv-scorer\n"
    )
    assert msg == "test.yaml: schedulingProfiles[0].plugins[1].pluginRef: no plugin named 'kv-scorer'; defined: queue-scorer"


def test_duplicate_plugin_names():
    msg = error_of("plugins:\n- type: queue-scorer\n- type: queue-scorer\n")
    assert "plugins[1].name" in msg and "duplicate plugin name 'queue-scorer' (also plugins[0])" in msg


def test_two_pickers_in_one_profile():
    msg = error_of(
        "plugins:\n- type: max-score-picker\n- type: random-picker\nschedulingProfiles:\n- name: p\n  plugins:\n"
        "  - pluginRef: max-score-picker\n  - pluginRef: random-picker\n"
    )
    assert "schedulingProfiles[0].plugins[1].pluginRef" in msg and "one picker per profile" in msg


def test_two_pickers_without_profiles():
    msg = error_of("plugins:\n- type: max-score-picker\n- type: random-picker\n")
    assert msg.startswith("test.yaml: plugins[1]: profile 'default' already has picker 'max-score-picker'")


def test_the_same_plugin_twice_in_a_profile():
    msg = error_of(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n"
        "  - pluginRef: queue-scorer\n  - pluginRef: queue-scorer\n"
    )
    assert "schedulingProfiles[0].plugins[1].pluginRef" in msg and "already in profile" in msg


def test_profile_handler_in_a_profile_is_refused():
    msg = error_of(
        "plugins:\n- type: single-profile-handler\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n"
        "  plugins:\n  - pluginRef: single-profile-handler\n"
    )
    assert "is not a filter, scorer or picker" in msg


def test_negative_weight():
    msg = error_of(
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n"
        "  - pluginRef: queue-scorer\n    weight: -1\n"
    )
    assert "schedulingProfiles[0].plugins[0].weight: expected a finite number >= 0" in msg


def test_several_profiles_load_with_the_disagg_profile_handler():
    cfg = load(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: disagg-profile-handler\n"
        "schedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n"
        "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n"
    )
    assert [p.name for p in cfg.profiles] == ["prefill", "decode"]
    assert cfg.profile_handler.type == "disagg-profile-handler"


def test_unknown_top_level_key():
    msg = error_of("plugins:\n- type: queue-scorer\nschedulingProfile: []\n")
    assert "test.yaml: schedulingProfile: unknown field; expected one of apiVersion" in msg


def test_wrong_api_version_and_kind():
    with pytest.raises(ConfigError, match=r"x: apiVersion: expected one of"):
        load_config("apiVersion: v1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n", "x")
    with pytest.raises(ConfigError, match=r"x: kind: expected EndpointPickerConfig, got 'Pod'"):
        load_config("apiVersion: llm-d.ai/v1alpha1\nkind: Pod\nplugins: [{type: queue-scorer}]\n", "x")


def test_invalid_yaml_and_empty_documents():
    with pytest.raises(ConfigError, match=r"^x: invalid YAML at line 2, column 1: "):
        load_config("plugins: [", "x")
    with pytest.raises(ConfigError, match=r"^x: empty"):
        load_config("", "x")
    with pytest.raises(ConfigError, match=r"^x: plugins: expected a non-empty list"):
        load_config(HEADER, "x")


def test_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read the config file"):
        load_config_file(tmp_path / "missing.yaml")


# -- wiring ------------------------------------------------------------------------------------


def test_server_builds_its_scheduler_from_config_text():
    text = HEADER + "plugins:\n- type: active-request-scorer\n- type: weighted-random-picker\n"
    server = EppServer(ServeOptions(config_text=text, max_endpoints=2))
    profile = server.scheduler.profile
    assert [w.scorer.type for w in profile.scorers] == ["active-request-scorer"]
    assert profile.picker.type == "weighted-random-picker" and profile.picker.max_endpoints == 2


def test_server_builds_its_scheduler_from_a_config_file():
    server = EppServer(ServeOptions(config_file=str(WEIGHTED)))
    assert len(server.scheduler.profile.scorers) == 5
    assert server.scheduling_source == f"config {WEIGHTED}"


def test_a_strategy_runs_with_its_producers_and_the_servers_latency_model():
    server = EppServer(ServeOptions(strategy="best"))
    assert any(type(p).__name__ == "PredictedLatencyProducer" for p in server.scheduler.plugins)
    [w] = server.scheduler.profile.scorers
    assert w.scorer.ctx.latency is server.latency  # fed by request control, not a model of its own


def test_cli_config_error_exits_2_with_the_message(capsys):
    rc = cli.main(["serve", "--config-text", HEADER + "plugins:\n- type: nope\n"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "epp: configuration error: --config-text: plugins[0].type: unknown plugin type 'nope'" in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--strategy", "load", "--config-text", "x"],
        ["--config-file", "a", "--config-text", "x"],
        ["--strategy", "random", "--config-file", "a"],
    ],
)
def test_cli_scheduling_flags_are_mutually_exclusive(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *flags])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_llm_d_types_not_implemented_are_refused_with_the_reason():
    from pickers.config.registry import PLUGINS
    from pickers.config.unsupported import UNSUPPORTED_TYPES

    assert not PLUGINS.keys() & UNSUPPORTED_TYPES.keys(), "implemented types must leave UNSUPPORTED_TYPES"
    text = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: header-based-testing-filter
"""
    with pytest.raises(ConfigError) as e:
        load_config(text, "test-only.yaml")
    msg = str(e.value)
    assert msg.startswith("test-only.yaml: plugins[1].type: plugin type 'header-based-testing-filter' (llm-d router) is not supported:")
    assert "test-only" in msg and "known types" not in msg
