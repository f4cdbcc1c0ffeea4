"""burst-prefix-cache-producer: the joint placement of one window (identical prompts kept whole, a
replica filled to maxPerReplica then the least loaded, prefix-sharing requests attached with
minColocateBlocks, longer prompts first, no affinity without overlap), the asyncio window in front of
the pick (concurrent identical requests land on one replica, or k per replica; a cancelled wait leaves
the batch; a full window lets requests go), and the config as llm-d's sample shapes it."""

from __future__ import annotations

from dataclasses import replace

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream, State
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import DEFAULT_CONFIG_TEXT, load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.indexes.prefix import block_hashes
from pickers.plugins.base import PluginContext
from pickers.plugins.producer.burst_assign import UNLIMITED, BurstEntry, assign
from pickers.plugins.producer.burst_prefix import BurstPrefixCacheProducer
from pickers.plugins.scorer.affinity.prefix import PrefixCacheScorer
from tests.unit.test_protocol import completion_body, send_request, set_headers

CONFIG = Path(__file__).parent / "configs" / "burst-prefix-cache.yaml"
BLOCK = 4  # tokens a block in these tests: 16 characters


def endpoints(n: int, running: tuple[int, ...] = ()) -> list[Endpoint]:
    eps = [Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000)) for i in range(n)]
    for ep, r in zip(eps, running):
        ep.metrics = replace(ep.metrics, running=r)  # a set Metrics is never changed in place
    return eps


def prompt(tag: str, blocks: int) -> str:
    """A prompt of `blocks` full 16-character blocks, each naming `tag` and its place."""
    return "".join(f"{tag}:{i:05d}".ljust(16, ".")[:16] for i in range(blocks))


def hashes(text: str) -> list[int]:
    return block_hashes("m", text, "", 2048, BLOCK * 4, partial=True)


def entries(eps: list[Endpoint], *texts: str) -> list[BurstEntry]:
    return [BurstEntry(hashes(t), eps) for t in texts]


def where(batch: list[BurstEntry]) -> list[str | None]:
    return [e.assigned.name if e.assigned is not None else None for e in batch]


# -- the placement of one window ----------------------------------------------------------------


def test_identical_prompts_are_kept_whole_on_one_replica():
    eps = endpoints(4)
    batch = entries(eps, *[prompt("a", 10)] * 8)
    assign(batch)
    assert len(set(where(batch))) == 1 and None not in where(batch)


def test_two_identical_groups_go_to_different_replicas():
    eps = endpoints(4)
    batch = entries(eps, *[prompt("a", 10)] * 3, *[prompt("b", 10)] * 3)
    assign(batch)
    placed = where(batch)
    assert len(set(placed[:3])) == 1 and len(set(placed[3:])) == 1 and placed[0] != placed[3]


def test_max_per_replica_fills_a_replica_then_spills_to_the_least_loaded():
    eps = endpoints(3)
    # the longer group is placed first: 2 on pod-0, 2 spilled to pod-1; the other one starts on the
    # replica with nothing yet (pod-2) and spills to the least loaded (pod-0 and pod-1 tie: the lower)
    batch = entries(eps, *[prompt("long", 20)] * 4, *[prompt("short", 5)] * 4)
    assign(batch, max_per_replica=2)
    assert where(batch) == [*["pod-0"] * 2, *["pod-1"] * 2, *["pod-2"] * 2, *["pod-0"] * 2]


def test_spill_prefers_fewer_running_requests_when_the_batch_load_is_even():
    eps = endpoints(3, running=(0, 9, 1))
    batch = entries(eps, *[prompt("a", 10)] * 6)
    assign(batch, max_per_replica=2)
    # equal batch load: the first run, then each spill, go by running requests (pod-0, pod-2, pod-1)
    assert where(batch) == ["pod-0", "pod-0", "pod-2", "pod-2", "pod-1", "pod-1"]


def test_a_group_larger_than_every_cap_is_spread_not_dropped():
    eps = endpoints(2)
    batch = entries(eps, *[prompt("a", 10)] * 5)
    assign(batch, max_per_replica=1)
    assert Counter(where(batch)) == {"pod-0": 3, "pod-1": 2}


def test_longer_prompts_are_placed_first():
    eps = endpoints(2, running=(0, 5))
    batch = entries(eps, prompt("short", 3), prompt("short", 3), prompt("long", 30), prompt("long", 30))
    assign(batch)
    # the long group arrived second but is placed first, on the idler replica
    assert where(batch) == ["pod-1", "pod-1", "pod-0", "pod-0"]


def test_a_request_sharing_its_prompt_with_no_other_gets_no_affinity():
    eps = endpoints(3)
    batch = entries(eps, prompt("a", 10), prompt("a", 10), prompt("lonely", 10), "")
    assign(batch, min_colocate_blocks=4)
    assert where(batch)[2:] == [None, None]
    assert where(batch)[0] is not None


def test_prompts_that_differ_only_in_a_short_last_block_are_not_identical():
    eps = endpoints(2)
    head = prompt("a", 10)
    batch = entries(eps, head + "tail one", head + "tail one", head + "tail two")
    assign(batch)
    assert where(batch)[0] == where(batch)[1] is not None and where(batch)[2] is None


def test_without_min_colocate_blocks_only_identical_groups_are_placed():
    eps = endpoints(2)
    shared = prompt("sys", 8)
    batch = entries(eps, shared + prompt("q1", 2), shared + prompt("q2", 2))
    assign(batch)
    assert where(batch) == [None, None]


def test_min_colocate_blocks_attaches_prefix_sharing_requests_to_the_replica_holding_the_prefix():
    eps = endpoints(2)
    a, c = prompt("a", 8), prompt("c", 8)
    # a group of prompt a+x, a lone request sharing a's 8 blocks, and two lone requests sharing c's
    batch = entries(eps, a + prompt("x", 2), a + prompt("x", 2), a + prompt("y", 2), c + prompt("p", 2), c + prompt("q", 2))
    assign(batch, min_colocate_blocks=4)
    placed = where(batch)
    assert placed[0] == placed[1] == placed[2]  # attached to the group's replica
    assert placed[3] == placed[4] != placed[0]


def test_min_colocate_blocks_is_a_threshold_on_the_shared_leading_blocks():
    eps = endpoints(2)
    a = prompt("a", 10)
    batch = entries(eps, a, a, prompt("a", 2) + prompt("z", 8))  # the third shares only 2 blocks
    assign(batch, min_colocate_blocks=4)
    assert where(batch)[2] is None


def test_prefix_attachment_stops_at_the_fair_share():
    eps = endpoints(2)
    shared = prompt("sys", 8)
    batch = entries(eps, *(shared + prompt(f"q{i}", 2) for i in range(4)))
    assign(batch, min_colocate_blocks=4)
    # the second joins the first, the third finds pod-0 at its fair share (4 requests, 2 replicas: 2)
    # and opens pod-1, where the fourth joins it (by load alone they would alternate)
    assert where(batch) == ["pod-0", "pod-0", "pod-1", "pod-1"]


def test_balance_by_tokens_weighs_prompt_blocks_not_requests():
    eps = endpoints(2)
    texts = [*[prompt("big", 100)] * 2, *[prompt("b", 10)] * 2, *[prompt("c", 10)] * 2]
    by_requests, by_tokens = entries(eps, *texts), entries(eps, *texts)
    assign(by_requests)
    assign(by_tokens, by_tokens=True)
    assert where(by_requests)[4] == "pod-0"  # 2 requests each: the tie goes to the lower address
    assert where(by_tokens)[4] == "pod-1"  # pod-0 carries the 100-block prompt


def test_the_replicas_are_the_first_placeable_requests_candidates():
    eps = endpoints(3)
    batch = [BurstEntry((), []), *entries(eps[1:], prompt("a", 4), prompt("a", 4))]
    assign(batch)
    assert where(batch)[1] in {"pod-1", "pod-2"}


# -- the window ----------------------------------------------------------------------------------


def request(i: int, text: str) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", {}, "completions", "m", text)


def producer(**kw) -> BurstPrefixCacheProducer:
    kw.setdefault("block_tokens", BLOCK)
    return BurstPrefixCacheProducer(**kw)


def assigned(p: BurstPrefixCacheProducer, req: InferenceRequest, eps: list[Endpoint]) -> str | None:
    m = p.prefix_matches(req, CycleState(), eps)
    full = [addr for addr, (held, total, _) in m.items() if total and held == total]
    assert all(held == 0 for addr, (held, _, _) in m.items() if addr not in full)
    assert len(full) <= 1
    return full[0] if full else None


async def joined(p: BurstPrefixCacheProducer, n: int) -> None:
    """Let the tasks run until n requests wait in the open window."""
    for _ in range(100):
        if p._open is not None and p._open.size == n:
            return
        await asyncio.sleep(0)
    raise AssertionError("the requests did not join the window")


async def test_concurrent_identical_requests_in_one_window_land_on_one_replica():
    p, eps = producer(window_ms=20), endpoints(4)
    reqs = [request(i, prompt("rollout", 12)) for i in range(8)]
    await asyncio.gather(*(p.produce_async(r, eps) for r in reqs))
    chosen = {assigned(p, r, eps) for r in reqs}
    assert len(chosen) == 1 and None not in chosen
    assert p.counts["batches"] == 1 and p.counts["assigned"] == 8 and p._open is None


async def test_max_per_replica_puts_k_on_each_replica():
    p, eps = producer(window_ms=10_000, max_per_replica=2), endpoints(4)
    reqs = [request(i, prompt("rollout", 12)) for i in range(8)]
    tasks = [asyncio.create_task(p.produce_async(r, eps)) for r in reqs]
    await joined(p, 8)
    p.close()  # seal now rather than wait for the timer
    await asyncio.gather(*tasks)
    assert Counter(assigned(p, r, eps) for r in reqs) == {ep.address: 2 for ep in eps}


async def test_a_request_cancelled_while_it_waits_leaves_the_batch():
    p, eps = producer(window_ms=10_000, max_per_replica=2), endpoints(2)
    reqs = [request(i, prompt("rollout", 12)) for i in range(3)]
    tasks = [asyncio.create_task(p.produce_async(r, eps)) for r in reqs]
    await joined(p, 3)
    tasks[0].cancel()  # the client went away
    for _ in range(100):
        if tasks[0].done():
            break
        await asyncio.sleep(0)
    assert p._open is not None and p._open.size == 2
    p.close()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await asyncio.gather(*tasks[1:])
    assert reqs[0].attributes == {}
    # two left, both on one replica (k=2): the cancelled one took no place
    assert assigned(p, reqs[1], eps) == assigned(p, reqs[2], eps) is not None
    assert p.counts["cancelled"] == 1 and p.counts["assigned"] == 2


async def test_a_full_window_lets_later_requests_go_at_once_without_affinity():
    p, eps = producer(window_ms=10_000, max_batch_size=2), endpoints(2)
    reqs = [request(i, prompt("rollout", 12)) for i in range(3)]
    tasks = [asyncio.create_task(p.produce_async(r, eps)) for r in reqs[:2]]
    await joined(p, 2)
    await p.produce_async(reqs[2], eps)  # returns while the window is still open
    assert p._open is not None and reqs[2].attributes == {} and p.prefix_matches(reqs[2], CycleState(), eps) == {}
    assert p.counts["batch_full"] == 1
    p.close()
    await asyncio.gather(*tasks)
    assert assigned(p, reqs[0], eps) == assigned(p, reqs[1], eps) is not None


async def test_each_window_is_placed_on_its_own():
    p, eps = producer(window_ms=5), endpoints(3)
    first = [request(i, prompt("step1", 12)) for i in range(4)]
    await asyncio.gather(*(p.produce_async(r, eps) for r in first))
    second = [request(i, prompt("step2", 12)) for i in range(4)]
    await asyncio.gather(*(p.produce_async(r, eps) for r in second))
    assert p.counts["batches"] == 2
    assert len({assigned(p, r, eps) for r in first}) == 1 and len({assigned(p, r, eps) for r in second}) == 1


async def test_a_request_alone_in_its_window_gets_no_affinity():
    p, eps = producer(window_ms=5), endpoints(2)
    req = request(0, prompt("alone", 12))
    await p.produce_async(req, eps)
    assert assigned(p, req, eps) is None and p.counts["unassigned"] == 1


async def test_requests_without_a_prompt_or_candidates_do_not_wait():
    p = producer(window_ms=10_000)
    empty = request(0, "")
    assert not p.waits_for(empty)
    await p.produce_async(empty, endpoints(2))
    await p.produce_async(request(1, prompt("a", 4)), [])
    assert p._open is None


# -- through the Director and the prefix scorer ----------------------------------------------------

BURST_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: burst-prefix-cache-producer
  parameters: {windowDurationMs: 20, blockSizeTokens: 4}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: active-request-scorer, weight: 1}
"""


def director(config: str, n: int = 4) -> Director:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(n))
    cfg = load_config(config, "test", PluginContext(rng=random.Random(1)))
    return Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), EppMetrics())


def test_the_prefix_scorer_reads_the_burst_producers_match():
    cfg = load_config(BURST_CONFIG, "test", PluginContext())
    scorer, burst = cfg.plugins["prefix-cache-scorer"], cfg.plugins["burst-prefix-cache-producer"]
    assert isinstance(scorer, PrefixCacheScorer) and scorer.precise is burst
    assert burst in cfg.producers


async def test_a_burst_routed_through_the_director_lands_on_one_endpoint():
    d = director(BURST_CONFIG)
    reqs = [request(i, prompt("rollout", 40)) for i in range(8)]
    assert all(d.needs_data(r) for r in reqs)
    await asyncio.gather(*(d.prepare(r) for r in reqs))
    destinations = {d.route(r, None).destination for r in reqs}
    assert len(destinations) == 1


async def test_the_window_runs_over_the_subset_the_proxy_allows():
    d = director(BURST_CONFIG)
    reqs = [request(i, prompt("rollout", 40)) for i in range(4)]
    await asyncio.gather(*(d.prepare(r, ["10.0.0.3"]) for r in reqs))
    assert {d.route(r, ["10.0.0.3"]).destination for r in reqs} == {"10.0.0.3:8000"}


async def test_a_parsed_request_waits_in_preparing_for_the_window():
    d = director(BURST_CONFIG)
    stream = RequestStream(d)
    out = send_request(stream, completion_body(prompt("rollout", 10)))
    assert out == [] and stream.state is State.PREPARING
    assert stream.request is not None
    await d.prepare(stream.request, stream.subset)
    answer = stream.resume()
    assert set_headers(answer[0])["x-gateway-destination-endpoint"].startswith("10.0.0.")


def test_other_configs_do_not_wait():
    d = director(DEFAULT_CONFIG_TEXT)
    assert d.scheduler.async_producers == ()
    assert not d.needs_data(request(0, prompt("rollout", 10)))
    stream = RequestStream(d)
    assert send_request(stream, completion_body(prompt("rollout", 10))) and stream.state is not State.PREPARING


async def test_the_counts_are_exported():
    d = director(BURST_CONFIG)
    metrics = EppMetrics()
    metrics.attach_precise(d.scheduler.plugins)
    await asyncio.gather(*(d.prepare(request(i, prompt("rollout", 12))) for i in range(3)))
    text = metrics.exposition().decode()
    assert 'llm_epp_burst_prefix_requests_total{outcome="assigned",plugin_name="burst-prefix-cache-producer"} 3.0' in text
    assert 'llm_epp_burst_prefix_batches_total{plugin_name="burst-prefix-cache-producer"} 1.0' in text


# -- the config ---------------------------------------------------------------------------------


def build(parameters: dict) -> BurstPrefixCacheProducer:
    text = BURST_CONFIG.replace("{windowDurationMs: 20, blockSizeTokens: 4}", repr(parameters).replace("'", '"'))
    plugin = load_config(text, "test", PluginContext()).plugins["burst-prefix-cache-producer"]
    assert isinstance(plugin, BurstPrefixCacheProducer)
    return plugin


def test_defaults_are_llm_ds():
    cfg = load_config(BURST_CONFIG.replace("{windowDurationMs: 20, blockSizeTokens: 4}", "{}"), "test", PluginContext())
    p = cfg.plugins["burst-prefix-cache-producer"]
    assert isinstance(p, BurstPrefixCacheProducer)
    assert (p.window, p.max_per_replica, p.block_tokens, p.max_blocks, p.min_colocate_blocks, p.max_batch_size, p.by_tokens) == (
        0.1, UNLIMITED, 64, 2048, 0, 1000, False,
    )
    assert dict(cfg.plugin_parameters["burst-prefix-cache-producer"]) == {
        "windowDurationMs": 100, "maxPerReplica": -1, "blockSizeTokens": 64, "maxPrefixTokensToMatch": 0,
        "maxBatchSize": 1000, "balanceBy": "requests", "minColocateBlocks": 0,
    }  # fmt: skip


def test_every_parameter_is_honoured():
    p = build({"windowDurationMs": 250, "maxPerReplica": 3, "blockSizeTokens": 32, "maxPrefixTokensToMatch": 4096,
               "minColocateBlocks": 8, "maxBatchSize": -1, "balanceBy": "tokens"})  # fmt: skip
    assert (p.window, p.max_per_replica, p.block_chars, p.max_blocks, p.min_colocate_blocks, p.max_batch_size, p.by_tokens) == (
        0.25, 3, 128, 128, 8, UNLIMITED, True,
    )
    assert not build({"balanceBy": ""}).by_tokens  # llm-d: empty means requests


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"windowDurationMs": 0}, "windowDurationMs"),
        ({"windowDurationMs": 10_001}, "windowDurationMs"),
        ({"maxPerReplica": 0}, "maxPerReplica"),
        ({"blockSizeTokens": 0}, "blockSizeTokens"),
        ({"maxPrefixTokensToMatch": -1}, "maxPrefixTokensToMatch"),
        ({"maxPrefixTokensToMatch": 32}, "maxPrefixTokensToMatch"),  # under one 64-token block
        ({"minColocateBlocks": -1}, "minColocateBlocks"),
        ({"maxBatchSize": 0}, "maxBatchSize"),
        ({"balanceBy": "bytes"}, "balanceBy"),
        ({"windowDuration": "100ms"}, "windowDuration"),
    ],
)
def test_bad_parameters_are_refused_by_name(parameters, named):
    with pytest.raises(ConfigError, match=rf"parameters\.{named}\b"):
        build(parameters)


def test_the_prefix_scorer_bound_to_it_refuses_its_own_block_settings():
    text = BURST_CONFIG.replace("{prefixMatchInfoProducerName: burst-prefix-cache-producer}",
                                "{prefixMatchInfoProducerName: burst-prefix-cache-producer, blockSize: 64}")  # fmt: skip
    with pytest.raises(ConfigError, match="blockSize.*burst-prefix-cache-producer"):
        load_config(text, "test", PluginContext())


def test_our_config_in_the_samples_shape_checks_clean(capsys):
    rc = cli.main(["check-config", str(CONFIG)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "warning" not in out.out.lower() and out.err == ""
    assert ("burst-prefix-cache-producer: windowDurationMs=50, maxPerReplica=4, blockSizeTokens=64, maxPrefixTokensToMatch=65536, "
            "minColocateBlocks=8, maxBatchSize=512, balanceBy=tokens") in out.out  # fmt: skip
    assert "prefix-cache-scorer: prefixMatchInfoProducerName=burst-prefix-cache-producer" in out.out


async def test_stopping_the_server_lets_the_requests_of_an_open_window_go():
    from extproc.server.runner import EppServer, ServeOptions

    config = BURST_CONFIG.replace("windowDurationMs: 20", "windowDurationMs: 10000")
    server = EppServer(ServeOptions(config_text=config, admin_port=0))
    server.datastore.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(2))
    reqs = [request(i, prompt("rollout", 12)) for i in range(2)]
    waiting = [asyncio.create_task(server.director.prepare(r)) for r in reqs]
    burst = server.scheduler.async_producers[0]
    assert isinstance(burst, BurstPrefixCacheProducer)
    await joined(burst, 2)
    await server.stop(0)
    await asyncio.gather(*waiting)  # released by the stop, not the 10 s timer
    chosen = assigned(burst, reqs[0], endpoints(2))
    assert chosen is not None and {server.director.route(r, None).destination for r in reqs} == {chosen}
    assert 'llm_epp_burst_prefix_requests_total{outcome="assigned"' in server.metrics.exposition().decode()
