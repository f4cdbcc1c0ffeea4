"""llm-d parameters that name another plugin or set the approximate prefix match: honoured (resolved,
checked, applied) or refused with the reason, never dropped; deprecated no-ops load with a warning."""

from __future__ import annotations

import pytest

from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.scorer.affinity.prefix import UNLIMITED_BLOCKS, prefix_match

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PD_PROFILES = (
    "schedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n"
    "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n  - pluginRef: prefix-cache-scorer\n"
)


def load(body: str):
    return load_config(HEADER + body, "t.yaml")


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def req(prompt: str) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, "completions", "m", prompt)


# -- approx-prefix-cache-producer ------------------------------------------------------------


def test_producer_block_settings_become_the_prefix_scorers():
    cfg = load(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 128, maxPrefixTokensToMatch: 1280, "
        "lruCapacityPerServer: 500, autoTune: false}\n- type: prefix-cache-scorer\n"
    )
    scorer = cfg.plugins["prefix-cache-scorer"]
    assert (scorer.block_chars, scorer.max_blocks, scorer.lru_capacity, scorer.auto_tune) == (512, 10, 500, False)
    assert cfg.plugin_parameters["prefix-cache-scorer"] == {
        "prefixMatchInfoProducerName": "approx-prefix-cache-producer", "matchLengthWeight": 0.0, "matchLengthScaleTokens": 8192,
    }


def test_producer_defaults_are_llm_ds_with_the_64_token_floor():
    cfg = load("plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n")
    scorer = cfg.plugins["prefix-cache-scorer"]
    assert (scorer.block_chars, scorer.max_blocks) == (64 * 4, 131072 // 64)
    assert cfg.warnings == ()  # the default 16 is raised silently, as llm-d does


def test_a_given_block_size_below_64_tokens_is_raised_with_a_warning():
    cfg = load("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 16}\n- type: prefix-cache-scorer\n")
    assert cfg.plugins["prefix-cache-scorer"].block_chars == 256
    assert any("blockSizeTokens 16 is below the minimum 64; using 64" in w for w in cfg.warnings)


def test_a_long_prompt_is_matched_up_to_max_prefix_tokens_to_match():
    cfg = load(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64, maxPrefixTokensToMatch: 100000}\n"
        "- type: prefix-cache-scorer\n"
    )
    scorer = cfg.plugins["prefix-cache-scorer"]
    m = prefix_match(req("x" * 1_000_000), CycleState(), scorer.index, scorer.block_chars, scorer.max_blocks)
    assert len(m.hashes) == 100000 // 64


def test_both_caps_zero_match_the_whole_prompt():
    cfg = load(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 0}\n"
        "- type: prefix-cache-scorer\n"
    )
    assert cfg.plugins["prefix-cache-scorer"].max_blocks == UNLIMITED_BLOCKS


def test_max_prefix_blocks_to_match_applies_when_the_token_cap_is_zero():
    cfg = load(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {maxPrefixTokensToMatch: 0, maxPrefixBlocksToMatch: 7}\n"
        "- type: prefix-cache-scorer\n"
    )
    assert cfg.plugins["prefix-cache-scorer"].max_blocks == 7


def test_a_token_cap_below_one_block_is_refused():
    msg = error_of("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {maxPrefixTokensToMatch: 10}\n")
    assert "plugins[0].parameters.maxPrefixTokensToMatch" in msg and "less than one block" in msg


def test_the_deprecated_block_size_sets_block_size_tokens_with_a_warning():
    cfg = load("plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSize: 128}\n- type: prefix-cache-scorer\n")
    assert cfg.plugins["prefix-cache-scorer"].block_chars == 512
    assert any("blockSize is deprecated: use blockSizeTokens" in w for w in cfg.warnings)


def test_block_settings_on_a_scorer_bound_to_a_producer_are_refused():
    msg = error_of(
        "plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {maxPrefixBlocksToMatch: 256}\n"
    )
    assert msg.startswith("t.yaml: plugins[1].parameters.maxPrefixBlocksToMatch: prefix-cache-scorer: this scorer takes")


def test_the_named_producer_is_the_one_bound():
    cfg = load(
        "plugins:\n- name: gpu\n  type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64}\n"
        "- name: cpu\n  type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 256}\n"
        "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: cpu}\n"
    )
    assert cfg.plugins["prefix-cache-scorer"].block_chars == 1024


def test_two_producers_and_no_name_is_refused():
    msg = error_of(
        "plugins:\n- {name: a, type: approx-prefix-cache-producer}\n- {name: b, type: approx-prefix-cache-producer}\n"
        "- type: prefix-cache-scorer\n"
    )
    assert "plugins[2].parameters.prefixMatchInfoProducerName" in msg and "name the one" in msg


@pytest.mark.parametrize("target, expected", [("nope", "no plugin named 'nope'"), ("queue-scorer", "is not an approx-prefix-cache-producer")])
def test_a_dangling_or_wrong_producer_name_is_refused(target, expected):
    msg = error_of(f"plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  parameters: {{prefixMatchInfoProducerName: {target}}}\n")
    assert "plugins[1].parameters.prefixMatchInfoProducerName" in msg and expected in msg


# -- no-hit-lru-scorer, active-request-scorer ---------------------------------------------------


def test_no_hit_lru_matches_with_the_prefix_scorers_block_settings():
    cfg = load("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSize: 128, maxPrefixBlocksToMatch: 9}\n- type: no-hit-lru-scorer\n")
    lru = cfg.plugins["no-hit-lru-scorer"]
    assert (lru.block_chars, lru.max_blocks) == (128, 9)


def test_no_hit_lru_follows_the_producer_it_names():
    cfg = load(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 100}\n"
        "- type: no-hit-lru-scorer\n  parameters: {prefixMatchInfoProducerName: approx-prefix-cache-producer}\n"
    )
    assert cfg.plugins["no-hit-lru-scorer"].block_chars == 400


def test_no_hit_lru_dangling_producer_name_is_refused():
    msg = error_of("plugins:\n- type: no-hit-lru-scorer\n  parameters: {prefixMatchInfoProducerName: gone}\n")
    assert "plugins[0].parameters.prefixMatchInfoProducerName: no-hit-lru-scorer: 'gone': no plugin" in msg


@pytest.mark.parametrize(
    "body, parameter",
    [
        ("- type: no-hit-lru-scorer\n  parameters: {prefixPluginName: x, prefixPluginType: prefix-cache-scorer}\n", "prefixPluginName"),
        ("- type: active-request-scorer\n  parameters: {requestTimeout: 2m}\n", "requestTimeout"),
    ],
)
def test_parameters_llm_d_never_used_load_with_a_warning(body, parameter):
    cfg = load("plugins:\n" + body)
    assert any(f"parameter {parameter} is deprecated and has no effect" in w for w in cfg.warnings)


# -- pd-profile-handler, disagg-headers-handler --------------------------------------------------

PD = "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: prefix-cache-scorer\n"


def test_hash_block_size_with_threshold_0_cannot_matter_and_loads():
    load(PD + "- type: pd-profile-handler\n  parameters: {threshold: 0, hashBlockSize: 5}\n" + PD_PROFILES)


def test_hash_block_size_equal_to_the_prefix_block_size_loads():
    cfg = load(PD + "- type: pd-profile-handler\n  parameters: {threshold: 100, hashBlockSize: 64}\n" + PD_PROFILES)
    assert cfg.profile_handler.decider.block_chars == 64


def test_hash_block_size_that_differs_from_the_prefix_block_size_is_refused():
    msg = error_of(PD + "- type: pd-profile-handler\n  parameters: {threshold: 100, hashBlockSize: 5}\n" + PD_PROFILES)
    assert "plugins[3].parameters.hashBlockSize: pd-profile-handler: 5 differs from" in msg


def test_pd_handler_producer_name_must_resolve():
    msg = error_of(PD + "- type: pd-profile-handler\n  parameters: {threshold: 0, prefixMatchInfoProducerName: x}\n" + PD_PROFILES)
    assert "plugins[3].parameters.prefixMatchInfoProducerName" in msg and "'x': no plugin" in msg


def test_headers_handler_prefill_profile_must_be_the_handlers():
    msg = error_of(
        PD + "- type: disagg-headers-handler\n  parameters: {prefillProfile: other}\n- type: disagg-profile-handler\n" + PD_PROFILES
    )
    assert "plugins[3].parameters.prefillProfile: disagg-headers-handler: 'other' differs" in msg


def test_headers_handler_naming_another_existing_profile_as_encode_is_refused():
    msg = error_of(
        PD + "- type: disagg-headers-handler\n  parameters: {encodeProfile: decode}\n- type: disagg-profile-handler\n" + PD_PROFILES
    )
    assert "plugins[3].parameters.encodeProfile: disagg-headers-handler: 'decode' differs" in msg
    assert "x-encoder-hosts-ports" in msg


def test_headers_handler_without_a_disagg_handler_is_refused():
    msg = error_of("plugins:\n- type: queue-scorer\n- type: disagg-headers-handler\n")
    assert msg.startswith("t.yaml: plugins[1]: disagg-headers-handler: sets the prefill header")
