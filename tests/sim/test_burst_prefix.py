"""An RL-style burst on simulated vLLM servers: 8 samples of one prompt at once, every cache cold. With a
burst-prefix-cache-producer the window places them together and the pool prefills the prompt once (or
once per replica it spreads them to, with maxPerReplica); scored by load alone, as a cache-state scorer
scores cold caches, each replica prefills it. The Director picks, the request goes straight to the
simulator it names; the prefill tokens are the simulators' prompt tokens less their cache hits."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from extproc.datalayer.datastore import Datastore
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import load_config
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.plugins.base import PluginContext
from tests.sim.conftest import StartSim

REPLICAS, SAMPLES = 4, 8
PROMPT = "Solve step by step, then check the answer: a train leaves at noon. " * 60  # ~4,000 characters

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
LOAD_ONLY = HEAD + """\
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: active-request-scorer}]
"""
BURST = HEAD + """\
- type: burst-prefix-cache-producer
  parameters: {windowDurationMs: 20, maxPerReplica: %d}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer, weight: 1}]
"""


async def prefill_tokens(start_sim: StartSim, config: str) -> tuple[int, int]:
    """(prompt tokens the pool computed, replicas that served) for one burst on a fresh, cold pool."""
    sims = [await start_sim() for _ in range(REPLICAS)]
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"sim-{i}", "127.0.0.1", s.port) for i, s in enumerate(sims))
    cfg = load_config(config, "test", PluginContext())
    director = Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), EppMetrics())
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4}
    reqs = [InferenceRequest(f"r{i}", "/v1/completions", {}, "completions", "sim-model", PROMPT, max_tokens=4) for i in range(SAMPLES)]
    await asyncio.gather(*(director.prepare(r) for r in reqs))  # the burst arrives at once
    routes = [director.route(r, None) for r in reqs]
    async with aiohttp.ClientSession() as http:

        async def send(destination: str) -> None:
            async with http.post(f"http://{destination}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()

        await asyncio.gather(*(send(r.destination) for r in routes))
        computed = 0
        for s in sims:
            async with http.get(s.url + "/sim/stats") as r:
                stats = await r.json()
            computed += stats["prompt_tokens_total"] - stats["cached_prompt_tokens_total"]
    return computed, len({r.destination for r in routes})


@pytest.mark.parametrize(("per_replica", "replicas"), [(-1, 1), (4, 2)])
async def test_a_burst_of_one_prompt_is_prefilled_once_per_replica_it_lands_on(start_sim: StartSim, per_replica, replicas):
    spread, spread_replicas = await prefill_tokens(start_sim, LOAD_ONLY)
    placed, placed_replicas = await prefill_tokens(start_sim, BURST % per_replica)
    assert spread_replicas == REPLICAS and placed_replicas == replicas
    # about one prompt per replica that served (each computes it once; its other samples hit)
    assert placed < spread
    assert placed * REPLICAS // replicas == pytest.approx(spread, rel=0.1)
