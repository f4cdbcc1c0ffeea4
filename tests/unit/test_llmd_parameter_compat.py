"""Parameters as llm-d (and GIE, for the deprecated inference.networking.x-k8s.io configs) read them:
for plugin types whose llm-d factory reads no parameters (`_ *json.Decoder`) an unknown parameter loads
with a warning naming it, every other type refuses it; prefix-cache-scorer's `hashBlockSize` is GIE's
old name of `blockSize`."""

from __future__ import annotations

import pytest

from pickers.config.loader import load_config
from pickers.config.registry import LLMD_IGNORES_PARAMETERS, build_plugin
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.affinity.prefix import PrefixCacheScorer, prefix_match

GIE = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
LLMD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"

# llm-d v0.10: `git grep -n "Factory(name string, _ \*json.Decoder" HEAD -- pkg/`, the types those
# factories are registered under (test-only plugins and the cross-replica mock aside, which llm-epp does
# not register), and the two multicluster scorers that hand their parameters to two of those factories
LLMD_PARAMETERLESS = {
    "queue-scorer", "kv-cache-utilization-scorer", "running-requests-size-scorer", "lora-affinity-scorer",
    "multicluster-queue-scorer", "multicluster-kv-cache-utilization-scorer",
    "prefill-filter", "decode-filter", "encode-filter", "single-profile-handler",
    "always-disagg-pd-decider", "always-disagg-multimodal-decider",
    "global-strict-fairness-policy", "round-robin-fairness-policy",
    "fcfs-ordering-policy", "edf-ordering-policy", "slo-deadline-ordering-policy",
    "sheddable-eviction-filter", "priority-then-time-eviction-order-policy",
    "models-data-extractor", "dcgm-extractor", "endpoint-notification-source",
}  # fmt: skip


def test_the_rule_covers_exactly_the_types_whose_llm_d_factory_reads_no_parameters():
    assert set(LLMD_IGNORES_PARAMETERS) == LLMD_PARAMETERLESS


@pytest.mark.parametrize("type_name", sorted(LLMD_PARAMETERLESS))
def test_unknown_parameters_of_a_parameterless_type_load_with_a_warning_naming_each(type_name: str):
    built = build_plugin(type_name, type_name, {"hashBlockSize": 5, "lruCapacityPerServer": 31250}, PluginContext())
    assert "hashBlockSize" not in built.parameters
    assert [w.split(" has no effect")[0] for w in built.warnings] == [
        "parameter hashBlockSize", "parameter lruCapacityPerServer"]  # fmt: skip
    assert all("llm-d ignores it too" in w for w in built.warnings)


@pytest.mark.parametrize("type_name", ["load-aware-scorer", "prefix-cache-scorer", "max-score-picker", "prefix-based-pd-decider",
                                       "program-aware-fairness", "metrics-data-source"])  # fmt: skip
def test_types_whose_llm_d_factory_reads_parameters_still_refuse_an_unknown_one(type_name: str):
    with pytest.raises(ConfigError, match="blockSizeChars: unknown parameter"):
        build_plugin(type_name, type_name, {"blockSizeChars": 5}, PluginContext())


QUEUE_COPY_PASTE = """\
plugins:
- type: decode-filter
- type: max-score-picker
- type: queue-scorer
  parameters:
    hashBlockSize: 5
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


def test_a_guides_queue_scorer_with_prefix_parameters_loads_and_scores_as_without_them():
    """llm-d's guides copy the prefix scorer's parameters onto queue-scorer; llm-d's QueueScorerFactory
    never reads them, and neither does this one."""
    cfg = load_config(GIE + QUEUE_COPY_PASTE, "pd.yaml")
    plain = load_config(GIE + QUEUE_COPY_PASTE.split("  parameters:")[0] + "schedulingProfiles" +
                        QUEUE_COPY_PASTE.split("schedulingProfiles")[1], "plain.yaml")  # fmt: skip
    assert [w for w in cfg.warnings if "(queue-scorer)" in w] == [
        f"plugins[2] (queue-scorer): parameter {k} has no effect: this plugin type takes no such parameter, and llm-d "
        "ignores it too (its factory for this type reads no parameters)"
        for k in ("hashBlockSize", "lruCapacityPerServer", "maxPrefixBlocksToMatch")
    ]  # fmt: skip
    assert cfg.plugin_parameters["queue-scorer"] == {}
    eps = [Endpoint(EndpointSpec(f"e{i}", f"10.0.0.{i}", 8000)) for i in range(3)]
    for i, e in enumerate(eps):
        e.metrics = Metrics(waiting=i * 3)
    request = InferenceRequest("r", "/v1/completions", {}, "completions", "m", "hi")
    scores = [list(w.scorer.score(request, CycleState(), eps)) for c in (cfg, plain) for w in c.profile.scorers]
    assert scores[0] == scores[1] == [1.0, 0.5, 0.0]


# -- prefix-cache-scorer hashBlockSize (GIE's name of blockSize before its rename, GIE#1613) --------------

PROMPT = "abcdefghijkl"  # 12 characters


def _scorer(parameters: str, header: str = GIE) -> tuple[PrefixCacheScorer, tuple[str, ...], dict]:
    cfg = load_config(f"{header}plugins:\n- type: prefix-cache-scorer\n  parameters: {parameters}\n- type: max-score-picker\n", "t")
    scorer = cfg.plugins["prefix-cache-scorer"]
    assert isinstance(scorer, PrefixCacheScorer)
    return scorer, cfg.warnings, dict(cfg.plugin_parameters["prefix-cache-scorer"])


def _blocks(scorer: PrefixCacheScorer) -> int:
    request = InferenceRequest("r", "/v1/completions", {}, "completions", "m", PROMPT)
    return len(prefix_match(request, CycleState(), scorer.index, scorer.block_chars, scorer.max_blocks).hashes)


def test_hash_block_size_is_read_as_the_block_size_in_characters_with_a_warning():
    scorer, warnings, params = _scorer("{hashBlockSize: 5, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}")
    assert scorer.block_chars == 5 and params["blockSize"] == 5 and "hashBlockSize" not in params
    assert _blocks(scorer) == _blocks(_scorer("{blockSize: 5}")[0]) > _blocks(_scorer("{}")[0])
    said = [w for w in warnings if "hashBlockSize" in w]
    assert len(said) == 1 and "GIE's old name of blockSize" in said[0] and "5 characters a block" in said[0]


def test_hash_block_size_loads_alike_under_llm_ds_api_version():
    assert _scorer("{hashBlockSize: 5}", LLMD)[0].block_chars == 5


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ("{hashBlockSize: 5, blockSize: 64}", "hashBlockSize: prefix-cache-scorer: GIE's old name of blockSize; give blockSize only"),
        ("{hashBlockSize: 0}", "hashBlockSize: prefix-cache-scorer: expected an integer >= 1"),
        ("{hashBlockSize: five}", "hashBlockSize: prefix-cache-scorer: expected an integer"),
    ],
)  # fmt: skip
def test_bad_hash_block_size_is_refused_naming_it(parameters: str, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        _scorer(parameters)


def test_hash_block_size_on_a_scorer_bound_to_a_producer_is_refused_like_block_size():
    text = (f"{LLMD}plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n"
            "  parameters: {hashBlockSize: 5}\n- type: max-score-picker\n")  # fmt: skip
    with pytest.raises(ConfigError, match="hashBlockSize: .*takes its block settings from approx-prefix-cache-producer"):
        load_config(text, "t")
