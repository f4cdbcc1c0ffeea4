"""llm-d's kvblock index metrics on the precise index: `indexerConfig.kvBlockIndexConfig.enableMetrics`
counts them (exported on /metrics under llm-d's names), `metricsLoggingInterval` logs them."""

from __future__ import annotations

import asyncio
import logging

import pytest

from extproc.datalayer.kv_events import BlockRemoved, BlockStored, apply_events
from extproc.observability.metrics import log_kv_block_metrics
from extproc.server.runner import EppServer, ServeOptions
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.kv_blocks import IndexMetrics, KVBlockIndex, TierWeights, request_keys
from tests.unit.test_producers import HEADER, ep

A, B = "10.0.0.1:8000", "10.0.0.2:8000"
IDS = list(range(100, 116))  # 4 blocks of 4 tokens
FAMILIES = ("admissions", "evictions", "lookup_requests", "lookup_hits", "max_pod_hit_count")


def producer_config(index_config: str) -> str:
    return HEADER + (
        "plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
        "- type: precise-prefix-cache-producer\n  parameters:\n    tokenProcessorConfig: {blockSizeTokens: 4}\n"
        f"    indexerConfig: {{kvBlockIndexConfig: {index_config}}}\n    kvEventsConfig: {{discoverPods: false}}\n"
        "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n"
        "- type: max-score-picker\n"
    )


def request() -> InferenceRequest:
    req = InferenceRequest("r", "/v1/completions", {}, api="completions", model="m", prompt_text="x", body={"model": "m", "prompt": "x"})
    req.prompt_token_ids = IDS
    return req


def test_stores_removals_and_lookups_move_the_counters():
    index = KVBlockIndex(metrics=IndexMetrics())
    apply_events(index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4)])
    apply_events(index, B, [BlockStored([1, 2], None, IDS[:8], 4)])
    m = index.metrics
    assert (m.admissions, m.evictions, m.lookups) == (6, 0, 0)
    apply_events(index, A, [BlockRemoved([4, 99])])  # 99: a block the index never had
    assert m.evictions == 1
    keys = request_keys(IDS, 4, 100)
    assert index.lookup(keys) == {A: 3, B: 2}
    assert (m.lookups, m.hits, m.latency.count) == (1, 3, 1)  # hits: the longest chain one endpoint holds
    assert index.lookup([12345, *keys]) == {}  # a chain starts at the first block: nobody holds it
    assert (m.lookups, m.hits, m.latency.count) == (2, 3, 2)


def test_a_tier_weighted_lookup_counts_the_chain_in_blocks_not_the_weighted_score():
    index = KVBlockIndex(metrics=IndexMetrics())
    apply_events(index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4, medium="CPU")])
    held = index.lookup(request_keys(IDS, 4, 100), TierWeights(index, {"gpu": 1.0, "cpu": 0.5}))
    assert held == {A: 2} and index.metrics.hits == 4


def test_without_enable_metrics_nothing_is_counted_and_lookups_answer_the_same():
    counted, plain = KVBlockIndex(metrics=IndexMetrics()), KVBlockIndex()
    for index in (counted, plain):
        apply_events(index, A, [BlockStored([1, 2, 3], None, IDS[:12], 4)])
    keys = request_keys(IDS, 4, 100)
    assert plain.lookup(keys) == counted.lookup(keys) == {A: 3}
    assert plain.metrics is None


def test_speculative_entries_count_as_admissions_and_their_expiry_as_evictions():
    from pickers.framework.types import SchedulingResult
    from pickers.plugins.scorer.affinity.precise_prefix import PrecisePrefixCacheProducer

    now = [0.0]
    producer = PrecisePrefixCacheProducer(index=KVBlockIndex(metrics=IndexMetrics()), block_size=4, speculative_ttl=2.0,
                                          clock=lambda: now[0])  # fmt: skip
    cycle = CycleState()
    producer.matches(request(), cycle, [ep(A)])
    producer.pre_request(request(), cycle, SchedulingResult((ep(A),)))
    assert producer.index.metrics.admissions == 4
    now[0] = 3.0
    assert producer.speculative_entries() == 0
    assert producer.index.metrics.evictions == 4


def _server(index_config: str) -> EppServer:
    return EppServer(ServeOptions(config_text=producer_config(index_config), admin_port=0))


def test_metrics_shows_llm_ds_kv_block_families_only_with_enable_metrics():
    server = _server("{enableMetrics: true}")
    producer = next(iter(server.metrics.precise.values()))
    apply_events(producer.index, A, [BlockStored([1, 2, 3, 4], None, IDS, 4)])
    producer.prefix_matches(request(), CycleState(), [ep(A)])
    names = server.metrics.names()
    for prefix in ("llm_d_epp_kv_cache_index_", "kvcache_index_"):  # llm-d's name and its deprecated alias
        for family in FAMILIES:
            assert prefix + family + "_total" in names
        assert prefix + "lookup_latency_seconds_count" in names
    text = server.metrics.exposition().decode()
    assert "llm_d_epp_kv_cache_index_admissions_total 4.0" in text
    assert "llm_d_epp_kv_cache_index_lookup_requests_total 1.0" in text
    assert "llm_d_epp_kv_cache_index_lookup_hits_total 4.0" in text
    assert "llm_d_epp_kv_cache_index_lookup_latency_seconds_count 1.0" in text

    off = _server("{enableMetrics: false}").metrics.names()
    assert not any(n.startswith(("llm_d_epp_kv_cache_index_", "kvcache_index_")) for n in off)
    assert "inference_extension_precise_prefix_indexer_size" in off  # the index's own gauge stays


async def test_the_log_task_logs_a_summary_at_each_interval(caplog):
    metrics = IndexMetrics(admissions=5, evictions=2, lookups=3, hits=7)
    metrics.latency.observe(0.002)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 2:
            raise asyncio.CancelledError

    with caplog.at_level(logging.INFO, logger="extproc.observability.metrics"), pytest.raises(asyncio.CancelledError):
        await log_kv_block_metrics("precise", lambda: metrics, 60.0, sleep=fake_sleep)
    beats = [r for r in caplog.records if r.getMessage() == "kv-block index metrics beat"]
    assert slept == [60.0, 60.0, 60.0] and len(beats) == 2
    fields = beats[0].fields
    assert (fields["plugin"], fields["admissions"], fields["evictions"], fields["lookups"], fields["hits"]) == ("precise", 5, 2, 3, 7)
    assert fields["max_pod_hit_count"] == 7 and fields["latency_count"] == 1


def test_the_logging_interval_reads_llm_ds_nanoseconds_or_a_duration():
    for given, seconds in (("60000000000", 60.0), ("1m", 60.0), ("0", None)):
        server = _server(f"{{enableMetrics: true, metricsLoggingInterval: {given}}}")
        assert next(iter(server.metrics.precise.values())).metrics_logging_interval == seconds


async def test_the_server_supervises_the_log_task_only_with_an_interval():
    server = _server("{enableMetrics: true, metricsLoggingInterval: 1m}")
    await server.start()
    try:
        assert "kv-block-metrics-log/precise-prefix-cache-producer" in server.supervisor.running
    finally:
        await server.stop()
    server = _server("{enableMetrics: true}")
    await server.start()
    try:
        assert not any(n.startswith("kv-block-metrics-log/") for n in server.supervisor.running)
    finally:
        await server.stop()


def test_check_config_shows_the_effective_metrics_parameters(tmp_path, capsys):
    from extproc.cli import main as cli

    path = tmp_path / "precise.yaml"
    path.write_text(producer_config("{enableMetrics: true, metricsLoggingInterval: 60000000000}"))
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"kvBlockIndexConfig":{"inMemoryConfig":{"size":100000000,"podCacheSize":10},"enableMetrics":true,' in out
    assert '"metricsLoggingInterval":60000000000' in out
