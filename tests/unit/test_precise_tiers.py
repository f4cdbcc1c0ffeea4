"""KV-cache tiers in the precise index: vLLM's `medium` per BlockStored/BlockRemoved, and llm-d's
tier-weighted longest-prefix score (`indexerConfig.kvCacheBackendConfigs`)."""

from __future__ import annotations

import random

import pytest

from extproc.datalayer.kv_events import BlockRemoved, BlockStored, apply_events
from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.kv_blocks import KVBlockIndex, TierWeights, request_keys
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from tests.unit.test_producers import HEADER, ep

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
IDS = list(range(100, 116))  # 4 blocks of 4 tokens
KEYS = request_keys(IDS, 4, 16)


def index_with(*events: tuple[str, object]) -> KVBlockIndex:
    index = KVBlockIndex()
    for address, event in events:
        apply_events(index, address, [event])  # type: ignore[list-item]
    return index


def scores(index: KVBlockIndex, weights: dict[str, float]) -> dict[str, float]:
    return index.weighted_match(KEYS, TierWeights(index, weights))


W = {"gpu": 1.0, "cpu": 0.4}


def test_gpu_only_cpu_only_and_mixed_follow_llm_ds_longest_prefix_formula():
    index = index_with(
        (A, BlockStored([1, 2, 3, 4], None, IDS, 4)),  # no medium: gpu
        (B, BlockStored([1, 2, 3, 4], None, IDS, 4, medium="CPU")),  # events' media are lower-cased
        (C, BlockStored([1, 2], None, IDS[:8], 4, medium="GPU")),
        (C, BlockStored([3, 4], 2, IDS[8:], 4, medium="cpu")),
    )
    got = scores(index, W)
    assert got == pytest.approx({A: 4.0, B: 4 * 0.4, C: 2 + 2 * 0.4})
    assert index.match(KEYS) == {A: 4, B: 4, C: 4}  # unweighted: any medium holds the block


def test_a_block_on_both_tiers_counts_its_best_weight_and_stays_when_gpu_drops_it():
    index = index_with((A, BlockStored([1, 2, 3, 4], None, IDS, 4)))
    apply_events(index, A, [BlockStored([1, 2, 3, 4], None, [], 4, medium="CPU")])  # offloaded: no token ids
    assert scores(index, W) == pytest.approx({A: 4.0})
    apply_events(index, A, [BlockRemoved([3, 4])])  # evicted from the GPU, kept on the CPU
    assert scores(index, W) == pytest.approx({A: 2 + 2 * 0.4})
    apply_events(index, A, [BlockRemoved([2], medium="CPU")])  # block 2 still on the GPU
    assert scores(index, W) == pytest.approx({A: 2 + 2 * 0.4})
    apply_events(index, A, [BlockRemoved([3], medium="CPU")])  # block 3 on no medium: the match ends there
    assert scores(index, W) == pytest.approx({A: 2.0}) and index.match(KEYS) == {A: 2}
    assert index.blocks_of(A) == 3  # 1, 2 and 4 (4 no longer leads: after the missing 3)
    # a child stored later still resolves its parent through a block only the CPU holds
    apply_events(index, A, [BlockStored([5], 4, list(range(4)), 4)])
    assert index.stats(A).orphans == 0  # type: ignore[union-attr]


def test_the_match_stops_at_the_first_block_held_on_no_tier_and_unknown_media_weigh_one():
    index = index_with(
        (A, BlockStored([1], None, IDS[:4], 4, medium="cpu")),
        (A, BlockStored([3, 4], 2, IDS[8:], 4)),  # parent 2 unknown: orphans, not indexed
        (B, BlockStored([1, 2, 3], None, IDS[:12], 4, medium="disk")),  # a medium not configured: 1.0
    )
    assert scores(index, W) == pytest.approx({A: 0.4, B: 3.0})
    assert scores(index, {}) == pytest.approx({A: 1.0, B: 3.0})  # an empty list: every medium 1.0


def test_removal_from_a_medium_never_stored_on_changes_nothing():
    index = index_with((A, BlockStored([1, 2], None, IDS[:8], 4)))
    apply_events(index, A, [BlockRemoved([1, 2], medium="CPU")])
    assert index.match(KEYS) == {A: 2}


def producer_config(backends: str) -> str:
    return (
        "plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
        f"- type: precise-prefix-cache-producer\n  parameters:\n    tokenProcessorConfig: {{blockSizeTokens: 4}}\n"
        f"    indexerConfig: {{kvCacheBackendConfigs: {backends}}}\n"
        "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n"
        "- type: max-score-picker\n"
    )


def load(text: str):
    return load_config(HEADER + text, "test.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))


def request() -> InferenceRequest:
    req = InferenceRequest("r", "/v1/completions", {}, api="completions", model="m", prompt_text="x", body={"model": "m", "prompt": "x"})
    req.prompt_token_ids = IDS
    return req


def test_the_producer_weighs_tiers_and_the_scorer_reads_llm_ds_truncated_match_blocks():
    cfg = load(producer_config("[{name: gpu, weight: 1.0}, {name: cpu, weight: 0.4}]"))
    producer, scorer = cfg.plugins["precise-prefix-cache-producer"], cfg.plugins["prefix-cache-scorer"]
    apply_events(producer.index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4)])
    apply_events(producer.index, B, [BlockStored([1, 2, 3, 4], None, IDS, 4, medium="CPU")])
    apply_events(producer.index, C, [BlockStored([1, 2, 3], None, IDS[:12], 4, medium="CPU")])
    m = producer.prefix_matches(request(), CycleState(), [ep(A), ep(B), ep(C)])
    assert m == {A: (4, 4, 4), B: (1, 4, 4), C: (1, 4, 4)}  # int(4 x 0.4) = 1, int(3 x 0.4) = 1
    assert scorer.score(request(), CycleState(), [ep(A), ep(B), ep(C)]) == [1.0, 0.25, 0.25]
    assert cfg.plugin_parameters["precise-prefix-cache-producer"]["indexerConfig"]["kvCacheBackendConfigs"] == [
        {"name": "gpu", "weight": 1.0}, {"name": "cpu", "weight": 0.4}]  # fmt: skip


def test_llm_ds_default_weights_apply_when_left_out():
    cfg = load(producer_config("[{name: gpu, weight: 1.0}, {name: cpu, weight: 0.8}]").replace(
        "    indexerConfig: {kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.8}]}\n", ""))  # fmt: skip
    producer = cfg.plugins["precise-prefix-cache-producer"]
    assert producer.tier_weights.by_name == {"gpu": 1.0, "cpu": 0.8}
    apply_events(producer.index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4, medium="CPU")])
    assert producer.prefix_matches(request(), CycleState(), [ep(A)]) == {A: (3, 4, 4)}  # int(3.2)
    shown = cfg.plugin_parameters["precise-prefix-cache-producer"]["indexerConfig"]["kvCacheBackendConfigs"]
    assert shown == [{"name": "gpu", "weight": 1.0}, {"name": "cpu", "weight": 0.8}]


def test_the_deprecated_precise_scorer_weighs_tiers_as_the_producer():
    cfg = load("plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
               "- type: precise-prefix-cache-scorer\n  parameters: {tokenProcessorConfig: {blockSizeTokens: 4}, "
               "indexerConfig: {kvCacheBackendConfigs: [{name: cpu, weight: 0.5}]}}\n- type: max-score-picker\n")  # fmt: skip
    scorer = cfg.plugins["precise-prefix-cache-scorer"]
    apply_events(scorer.index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4, medium="cpu")])
    apply_events(scorer.index, B, [BlockStored([1, 2, 3, 4], None, IDS, 4)])  # gpu not listed: 1.0
    assert scorer.score(request(), CycleState(), [ep(A), ep(B)]) == [0.5, 1.0]


def test_six_media_besides_gpu_are_told_apart():
    cfg = load(producer_config("[{name: gpu, weight: 1.0}, " + ", ".join(f"{{name: t{i}, weight: 0.{i + 1}}}" for i in range(6)) + "]"))
    assert cfg is not None


@pytest.mark.parametrize(
    ("backends", "field", "fragment"),
    [
        ("[{name: gpu, weight: 1.5}]", "kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("[{name: gpu, weight: -0.1}]", "kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("[{name: gpu, weight: high}]", "kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("[{name: gpu}]", "kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("[{name: gpu, weight: .nan}]", "kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("[{name: gpu, weight: 1.0}, {name: gpu, weight: 0.5}]", "kvCacheBackendConfigs[1].name", "duplicate medium"),
        ("[{name: CPU, weight: 0.5}]", "kvCacheBackendConfigs[0].name", "lower-case"),
        ("[{weight: 0.5}]", "kvCacheBackendConfigs[0].name", "medium name"),
        ("[{name: cpu, weight: 0.5, tier: 2}]", "kvCacheBackendConfigs[0].tier", "unknown field"),
        ("{gpu: 1.0}", "indexerConfig.kvCacheBackendConfigs", "list of mappings"),
        ("[" + ", ".join(f"{{name: t{i}, weight: 0.5}}" for i in range(7)) + "]", "indexerConfig.kvCacheBackendConfigs",
         "7 media besides gpu; the index tells at most 6 apart"),
    ],
)
def test_bad_backend_configs_are_refused_naming_the_field(backends: str, field: str, fragment: str):
    with pytest.raises(ConfigError) as e:
        load(producer_config(backends))
    assert field in str(e.value) and fragment in str(e.value)


TIERED_GUIDE = """\
plugins:
- type: token-producer
  parameters:
    modelName: tiered-model
    vllm:
      url: http://127.0.0.1:8200
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: 64
    indexerConfig:
      kvBlockIndexConfig:
        inMemoryConfig:
          podCacheSize: 8
      kvCacheBackendConfigs:
      - name: gpu
        weight: 1.0
      - name: cpu
        weight: 0.4
    kvEventsConfig:
      topicFilter: "kv@"
      discoverPods: true
      podDiscoveryConfig:
        socketPort: 5557
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: decode-filter
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""


def test_the_tiered_guide_shape_passes_check_config(tmp_path, capsys):
    from extproc.cli import main as cli

    cfg = load(TIERED_GUIDE)
    producer = cfg.plugins["precise-prefix-cache-producer"]
    assert (producer.block_size, producer.kv_events_port, producer.index.pods_per_key) == (64, 5557, 8)
    assert producer.tier_weights.by_name == {"gpu": 1.0, "cpu": 0.4} and not cfg.warnings
    path = tmp_path / "tiered.yaml"
    path.write_text(HEADER + TIERED_GUIDE)
    assert cli.main(["check-config", str(path)]) == 0
    assert '"kvCacheBackendConfigs":[{"name":"gpu","weight":1.0},{"name":"cpu","weight":0.4}]' in capsys.readouterr().out


def test_the_medium_travels_from_the_wire_event_to_the_index():
    import msgspec

    from extproc.datalayer.kv_events import decode_event

    stored = decode_event(msgspec.msgpack.encode(BlockStored([1, 2, 3, 4], None, IDS, 4, medium="CPU")))
    removed = decode_event(msgspec.msgpack.encode(["BlockRemoved", [1], "CPU"]))  # the older array shape
    index = index_with((A, stored))
    assert scores(index, W) == pytest.approx({A: 1.6})
    apply_events(index, A, [removed])
    assert index.match(KEYS) == {}
