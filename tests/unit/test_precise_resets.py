"""The precise index forgets an endpoint whose cache may have changed unseen (a failing metrics
scrape, a dropped ZMQ connection, a stream error), so a restarted server gives no false hits before
its first event; and the EPP exports the precise index's size (metrics and /debug/endpoints)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import KV_EVENTS_PORT_LABEL, BlockStored, KVEventSubscriber, apply_events
from extproc.devstack.ports import reserve_port
from extproc.observability.metrics import EppMetrics
from extproc.server.admin import admin_app, endpoints_view
from pickers.config.loader import load_config
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.affinity.precise_prefix import precise_scorers

A = "10.0.0.1:8000"
B = "10.0.0.2:8000"

PRECISE_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  name: precise
  parameters: {tokenizer: sim, subscribe: false}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise, weight: 1}
  - {pluginRef: max-score-picker}
"""


def two_endpoints() -> tuple[Datastore, KVBlockIndex, KVEventSubscriber]:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    index = KVBlockIndex()
    sub = KVEventSubscriber(ds, index)
    for address in (A, B):
        apply_events(index, address, [BlockStored([1, 2], None, [1, 2, 3, 4, 5, 6, 7, 8], 4)])
    return ds, index, sub


def test_a_failing_scrape_drops_that_endpoints_entries_once_per_outage():
    ds, index, sub = two_endpoints()
    keys = request_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    assert index.match(keys) == {A: 2, B: 2}
    ds.record_scrape_error(A, "ClientConnectorError: connection refused")
    assert index.match(keys) == {B: 2} and index.blocks_of(A) == 0
    assert sub.resets == {"scrape_failed": 1}
    # still down: no new reset; its events (after a restart) rebuild it
    apply_events(index, A, [BlockStored([9], None, [1, 2, 3, 4], 4)])
    ds.record_scrape_error(A, "timed out after 1s")
    assert index.blocks_of(A) == 1 and sub.resets == {"scrape_failed": 1}
    # back, then failing again: a new outage
    ds.update_metrics(A, Metrics(updated_at=1.0))
    ds.record_scrape_error(A, "HTTP 503")
    assert index.blocks_of(A) == 0 and sub.resets == {"scrape_failed": 2}
    assert index.blocks_of(B) == 2


def test_an_endpoint_the_index_never_held_is_not_counted():
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    sub = KVEventSubscriber(ds, KVBlockIndex())
    ds.record_scrape_error(A, "refused")
    assert sub.resets == {}


async def test_a_stream_error_drops_the_entries_before_reconnecting():
    ds, index, sub = two_endpoints()
    calls: list[int] = []

    async def stream(address, zmq_address, backoff, seq):  # type: ignore[no-untyped-def]
        calls.append(index.blocks_of(A))
        if len(calls) == 1:
            raise OSError("connection reset")
        ds.set_endpoints([EndpointSpec("b", "10.0.0.2", 8000)])  # A leaves: _follow ends

    sub._stream = stream  # type: ignore[method-assign]
    await asyncio.wait_for(sub._follow(A, "tcp://10.0.0.1:5557"), 5)
    assert calls == [2, 0]  # the reconnect started from nothing
    assert sub.resets["stream_error"] == 1 and index.blocks_of(B) == 2


async def test_an_idle_timeout_keeps_the_entries():
    ds, index, sub = two_endpoints()
    calls: list[int] = []

    async def stream(address, zmq_address, backoff, seq):  # type: ignore[no-untyped-def]
        calls.append(index.blocks_of(A))
        if len(calls) == 1:
            raise TimeoutError()
        ds.set_endpoints([])

    sub._stream = stream  # type: ignore[method-assign]
    await asyncio.wait_for(sub._follow(A, "tcp://10.0.0.1:5557"), 5)
    assert calls == [2, 2] and sub.resets == {}


async def _completion(url: str, prompt: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", json={"model": "sim-model", "prompt": prompt, "max_tokens": 2}) as r:
            assert r.status == 200


async def _until(cond, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.02)):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


async def test_a_restarted_simulator_gives_no_false_hits_before_its_first_event():
    """A real simulator publishing over ZMQ: it stops (the process dies) and starts again on the
    same ports with an empty cache. Before it publishes anything, the index already holds nothing
    for it: the SUB socket's disconnect was seen. Its first events then rebuild the entries."""
    from vllm_sim import tokens
    from vllm_sim.config import SimConfig
    from vllm_sim.kv_events import KVEventsConfig
    from vllm_sim.server import SimServer

    # Held for the whole test, so the restarted simulator finds both ports free (ports.py).
    kv_reserved, http_reserved = reserve_port("0.0.0.0"), reserve_port()
    kv_port, http_port = kv_reserved.port, http_reserved.port
    config = SimConfig.from_profile("gpu", time_scale=0.01, block_size=4, port=http_port, kv_events=KVEventsConfig(f"tcp://*:{kv_port}"))
    index = KVBlockIndex()
    ds = Datastore()
    sub = KVEventSubscriber(ds, index, default_port=None)
    task = asyncio.create_task(sub.run())
    address = f"127.0.0.1:{http_port}"
    ds.set_endpoints([EndpointSpec("s", "127.0.0.1", http_port, labels={KV_EVENTS_PORT_LABEL: str(kv_port)})])
    prompt = "a prompt long enough to fill several blocks of four tokens each"
    keys = request_keys(tokens.encode(prompt), 4, 256)
    try:
        sim = SimServer(config)
        await sim.start()
        await asyncio.sleep(0.3)  # the SUB socket connects
        await _completion(sim.url, prompt)
        assert await _until(lambda: index.match(keys) == {address: len(keys)})
        await sim.stop()
        assert await _until(lambda: index.blocks_of(address) == 0), "the dropped connection did not reset the endpoint"
        assert sub.resets["disconnected"] >= 1
        sim = SimServer(config)  # same ports, empty cache
        await sim.start()
        try:
            await asyncio.sleep(0.5)  # ZMQ reconnects by itself
            assert index.match(keys) == {}  # no false hit before its first event
            await _completion(sim.url, prompt)
            assert await _until(lambda: index.match(keys) == {address: len(keys)})  # rebuilt from its new events
        finally:
            await sim.stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        kv_reserved.close()
        http_reserved.close()


def _precise_profiles(ds: Datastore):  # type: ignore[no-untyped-def]
    cfg = load_config(PRECISE_CONFIG, "test", PluginContext(ApproxPrefixIndex(), random.Random(0), 1))
    return cfg.profiles


def test_the_precise_index_size_is_exported_beside_the_approximate_one():
    ds, index, sub = two_endpoints()
    profiles = _precise_profiles(ds)
    approx = ApproxPrefixIndex()
    m = EppMetrics(pool_name="p", version="t")
    (scorer,) = precise_scorers(profiles).values()
    scorer.subscriber = sub  # subscribe: false in the config; this one follows the datastore
    m.attach(ds, approx)
    m.attach_precise(p for prof in profiles for p in prof.plugins())
    for address in (A, B):
        apply_events(scorer.index, address, [BlockStored([1, 2, 3], None, list(range(12)), 4)])
    sub.index = scorer.index
    ds.record_scrape_error(B, "refused")
    text = m.exposition().decode()
    assert 'inference_extension_precise_prefix_indexer_size{plugin_name="precise"} 3.0' in text
    assert 'inference_extension_precise_prefix_indexer_resets_total{plugin_name="precise",reason="scrape_failed"} 1.0' in text
    # the GIE series keeps its meaning: the approximate index, no labels
    assert "\ninference_extension_prefix_indexer_size 0.0\n" in text


def test_no_precise_series_without_a_precise_scorer():
    m = EppMetrics(pool_name="p", version="t")
    m.attach_precise([])
    assert not any(n.startswith("inference_extension_precise") for n in m.names())


async def test_debug_endpoints_shows_the_precise_blocks_per_endpoint():
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    profiles = _precise_profiles(ds)
    (scorer,) = precise_scorers(profiles).values()
    apply_events(scorer.index, A, [BlockStored([1, 2], None, list(range(8)), 4)])
    view = {e["address"]: e for e in endpoints_view(ds, None, precise_scorers(profiles))}
    assert view[A]["precise_prefix_blocks"] == {"precise": 2} and view[B]["precise_prefix_blocks"] == {"precise": 0}
    assert "precise_prefix_blocks" not in endpoints_view(ds, None)[0]
    director = SimpleNamespace(scheduler=SimpleNamespace(plugins=[p for prof in profiles for p in prof.plugins()]))
    async with TestClient(TestServer(admin_app(ds, None, director, {}))) as client:  # type: ignore[arg-type]
        eps = (await (await client.get("/debug/endpoints")).json())["endpoints"]
    assert [e["precise_prefix_blocks"] for e in eps] == [{"precise": 2}, {"precise": 0}]
