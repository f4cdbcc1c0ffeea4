"""latency-pd-decider: disagg-profile-handler prefills remotely only when the latency model predicts the
best prefill endpoint's TTFT plus the KV transfer beats a local prefill plus the stall it would cost the
decode endpoint's running batch; the prefill pick is the endpoint with the best predicted TTFT (a CPU
prefill server only when it finishes sooner); untried endpoints of unknown hardware get one short probe.
Driven through pickers/configs/pd-latency.yaml, the loader and the Scheduler, as the EPP does.

Numbers below are the model's prior (a GPU server): TTFT = 20 ms + tokens / 15,928 tokens/s + 0.2 ms a
running request; TPOT = 10 ms + 0.1 ms a running request; KV transfer = 2 ms + tokens / 200,000/s."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from pickers.config.loader import EndpointPickerConfig, load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.profile.latency_pd_decider import LatencyPdDecider

CONFIG = Path(__file__).resolve().parents[2] / "pickers" / "configs" / "pd-latency.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PREFILLER = "x-prefiller-host-port"
GPU_BLOCKS, CPU_BLOCKS = 8000, 2000
S_PER_TOKEN = 1 / 15_928


def endpoint(name: str, role: str, *, blocks: int = GPU_BLOCKS, running: int = 0, queued: int = 0) -> Endpoint:
    i = sum(map(ord, name)) % 250
    ep = Endpoint(EndpointSpec(name, f"10.0.{0 if role == 'prefill' else 1}.{i}", 8000, {ROLE_LABEL: role}))
    ep.metrics = Metrics(running=running, block_size=16, num_gpu_blocks=blocks)
    ep.in_flight_prefill_tokens = queued
    return ep


def setup(config: str | Path = CONFIG, *, explain: bool = False) -> tuple[Scheduler, EndpointPickerConfig, PluginContext]:
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0))
    cfg = load_config_file(config, ctx) if isinstance(config, Path) else load_config(HEADER + config, "t.yaml", ctx)
    sched = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers, explain=explain)
    return sched, cfg, ctx


def variant(*replacements: tuple[str, str]) -> str:
    """pd-latency.yaml's body with these replacements."""
    body = CONFIG.read_text().split("kind: EndpointPickerConfig\n", 1)[1]
    for old, new in replacements:
        assert old in body
        body = body.replace(old, new)
    return body


def req(tokens: int) -> InferenceRequest:
    head = uuid.uuid4().hex  # nobody holds any of it
    text = (head + " lorem ipsum dolor sit amet" * (tokens * 4 // 26 + 1))[: tokens * 4]
    return InferenceRequest(f"r-{head[:6]}", "/v1/completions", {}, "completions", "m", text, max_tokens=16)


def prefiller(result: SchedulingResult) -> str | None:
    return result.request_headers.get(PREFILLER)


def fit(ctx: PluginContext, ep: Endpoint, tokens_per_s: float, n: int = 30) -> None:
    """Teach the model the endpoint prefills at this rate (10 ms overhead)."""
    for i in range(n):
        tokens = 200 + 100 * i
        ctx.latency.observe_ttft(ep, tokens, 0, 0.010 + tokens / tokens_per_s)


def test_a_short_prompt_stays_local_without_running_the_prefill_profile():
    # decode-filter without prefillEndpointsBelowTokens: the decode endpoint, however busy
    sched, cfg, _ = setup(variant(("  parameters:\n    prefillEndpointsBelowTokens: 256\n", "")), explain=True)
    d, p = endpoint("d", "decode", running=50), endpoint("p", "prefill")
    result = sched.schedule(req(200), [d, p])  # under minUncachedTokens 256, however busy d is
    assert result.endpoints == [d] and prefiller(result) is None
    assert not any(k.startswith("prefill/") for k in result.scores or {})


def test_with_pd_latency_yaml_an_idle_prefill_endpoint_serves_a_short_prompt_whole():
    sched, cfg, _ = setup(explain=True)
    d, p = endpoint("d", "decode", running=50), endpoint("p", "prefill")
    d.in_flight = 20  # busy decoding
    result = sched.schedule(req(200), [d, p])  # under prefillEndpointsBelowTokens 256
    assert result.endpoints == [p] and prefiller(result) is None
    assert not any(k.startswith("prefill/") for k in result.scores or {})  # the prefill profile never ran
    d.in_flight, p.in_flight = 0, 20
    assert sched.schedule(req(200), [d, p]).endpoints == [d]  # the load scorers place it
    long = sched.schedule(req(2000), [endpoint("d2", "decode"), p])
    assert long.endpoints[0].name == "d2"  # long prompts see the decode endpoints only
    cpu = endpoint("cpu", "prefill", blocks=CPU_BLOCKS)  # another kind of box: never a decoder
    d.in_flight = 20
    assert sched.schedule(req(200), [d, cpu]).endpoints == [d]


def test_an_idle_decode_endpoint_prefills_a_long_prompt_itself():
    # local 20 + 125.6 ms; remote adds the transfer (12 ms) and a decode step (10 ms): local wins
    sched, _, _ = setup()
    result = sched.schedule(req(2000), [endpoint("d", "decode"), endpoint("p", "prefill")])
    assert prefiller(result) is None


def test_a_running_batch_on_the_decode_endpoint_sends_a_long_prompt_to_a_prefill_endpoint():
    # 8 running: a local prefill stalls each of them for 2000 / 15,928 s (~1 s in all)
    sched, _, _ = setup()
    d, p = endpoint("d", "decode", running=8), endpoint("p", "prefill")
    result = sched.schedule(req(2000), [d, p])
    assert result.endpoints == [d] and prefiller(result) == p.address


def test_slowdown_weight_zero_compares_ttft_alone():
    sched, _, _ = setup(variant(("    minUncachedTokens: 256\n", "    minUncachedTokens: 256\n    slowdownWeight: 0\n")))
    result = sched.schedule(req(2000), [endpoint("d", "decode", running=8), endpoint("p", "prefill")])
    assert prefiller(result) is None


def test_a_prefill_queue_on_the_decode_endpoint_sends_the_prompt_away():
    sched, _, _ = setup()
    d, p = endpoint("d", "decode", queued=20_000), endpoint("p", "prefill")
    assert prefiller(sched.schedule(req(2000), [d, p])) == p.address


def test_the_prefill_pick_is_the_endpoint_with_the_best_predicted_ttft():
    sched, _, _ = setup()
    d = endpoint("d", "decode", running=8)
    busy, idle = endpoint("p-busy", "prefill", queued=6_000), endpoint("p-idle", "prefill")
    for _ in range(5):
        assert prefiller(sched.schedule(req(2000), [d, busy, idle])) == idle.address


def test_when_every_prefill_endpoint_is_slower_than_local_the_prompt_stays_local():
    sched, _, _ = setup()
    d = endpoint("d", "decode", running=8)  # budget ~1.15 s
    result = sched.schedule(req(2000), [d, endpoint("p0", "prefill", queued=30_000), endpoint("p1", "prefill", queued=40_000)])
    assert prefiller(result) is None


def test_a_cpu_prefill_server_takes_only_the_work_it_finishes_sooner():
    sched, _, ctx = setup()
    gpu, cpu = endpoint("p-gpu", "prefill"), endpoint("p-cpu", "prefill", blocks=CPU_BLOCKS)
    fit(ctx, cpu, 400)  # 2,000 tokens: ~5 s there
    d = endpoint("d", "decode", running=8)
    assert prefiller(sched.schedule(req(2000), [d, gpu, cpu])) == gpu.address  # the GPU one, by far
    assert prefiller(sched.schedule(req(2000), [d, cpu])) is None  # ~5 s against ~1.15 s local
    # a decode endpoint 100,000 prefill tokens behind (~6.3 s) with 8 running: the CPU is sooner
    swamped = endpoint("d2", "decode", running=8, queued=100_000)
    assert prefiller(sched.schedule(req(2000), [swamped, cpu])) == cpu.address


def test_an_untried_endpoint_of_unknown_hardware_gets_one_short_probe_at_a_time():
    sched, _, ctx = setup()
    d, cpu = endpoint("d", "decode", running=8), endpoint("p-cpu", "prefill", blocks=CPU_BLOCKS)
    # the prior would call it a GPU; it has other KV geometry than d, so it is not trusted with 2,000 tokens
    assert prefiller(sched.schedule(req(2000), [d, cpu])) is None
    # a prompt of at most maxProbeTokens (512) tries it
    assert prefiller(sched.schedule(req(400), [d, cpu])) == cpu.address
    cpu.in_flight = 1  # the probe is out: no second one until it answers
    assert prefiller(sched.schedule(req(400), [d, cpu])) is None
    cpu.in_flight = 0
    fit(ctx, cpu, 400, n=1)  # it answered, slowly: now it is predicted from its own fit
    assert prefiller(sched.schedule(req(400), [d, cpu])) is None


def test_an_untried_prefill_endpoint_with_the_decode_endpoints_geometry_is_taken_as_the_same_accelerator():
    sched, _, _ = setup()
    d, p = endpoint("d", "decode", running=8), endpoint("p", "prefill")
    assert prefiller(sched.schedule(req(3000), [d, p])) == p.address  # prior against prior


def test_a_prefill_profile_without_the_decider_as_scorer_has_its_pick_judged_and_loads_with_a_warning():
    sched, cfg, _ = setup(variant(("  - pluginRef: latency-pd-decider\n  - pluginRef: max-score-picker\n", "  - pluginRef: random-picker\n"),
                                  ("- type: max-score-picker\n", "- type: max-score-picker\n- type: random-picker\n")))  # fmt: skip
    assert any("is not a scorer of the 'prefill' profile" in w for w in cfg.warnings)
    d = endpoint("d", "decode", running=8)
    busy, idle = endpoint("p-busy", "prefill", queued=50_000), endpoint("p-idle", "prefill")
    seen = set()
    for _ in range(40):
        result = sched.schedule(req(2000), [d, busy, idle])
        seen.add(prefiller(result))
        if prefiller(result) is None:  # dropped: neither charged nor recorded as holding the prompt
            assert result.profile_results is None and [c.endpoint for c in result.in_flight or ()] == [d]
    assert seen == {idle.address, None}  # the random pick of the busy one is dropped: local is sooner


def test_explain_shows_the_decision_inputs():
    sched, cfg, _ = setup(explain=True)
    d, p = endpoint("d", "decode", running=8), endpoint("p", "prefill")
    scores = sched.schedule(req(2000), [d, p]).scores
    assert scores is not None
    n = "latency-pd-decider"
    local = (0.020 + 2000 * S_PER_TOKEN + 8 * 0.0002) * 1000
    assert scores[f"{n}/local_ttft_ms"][d.address] == pytest.approx(local, abs=0.1)
    assert scores[f"{n}/slowdown_ms"][d.address] == pytest.approx(8 * 2000 * S_PER_TOKEN * 1000, abs=0.1)
    assert scores[f"{n}/transfer_ms"][d.address] == pytest.approx(2 + 2000 / 200, abs=0.1)
    remote = (0.020 + 2000 * S_PER_TOKEN) * 1000 + 12 + (10 + 8 * 0.1)
    assert scores[f"{n}/remote_ttft_ms"][p.address] == pytest.approx(remote, abs=0.1)
    assert scores[f"{n}/disaggregate"] == {d.address: 1.0}
    assert scores["prefill/latency-pd-decider"][p.address] == 1.0


def test_a_cached_prompt_on_the_decode_endpoint_stays_there():
    sched, _, _ = setup()
    d, p = endpoint("d", "decode", running=8), endpoint("p", "prefill")
    first = req(2000)
    assert prefiller(sched.schedule(first, [d, p])) == p.address
    again = InferenceRequest("r2", "/v1/completions", {}, "completions", "m", first.prompt_text + " more", max_tokens=16)
    result = sched.schedule(again, [d, p])  # d holds all of it now (recorded at the pick)
    assert result.endpoints == [d] and prefiller(result) is None


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ("slowdownWeight: -1", "slowdownWeight", "expected a number >= 0"),
        ("slowdownWeight: .inf", "slowdownWeight", "expected a finite number"),
        ("minUncachedTokens: -5", "minUncachedTokens", ">= 0"),
        ("maxProbeTokens: many", "maxProbeTokens", "integer"),
        ("latencyPredictionInfoProducerName: nope", "latencyPredictionInfoProducerName", "'nope': no plugin"),
        ("nonCachedTokens: 512", "nonCachedTokens", "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + f"plugins:\n- type: latency-pd-decider\n  parameters: {{{params}}}\n", "t.yaml", PluginContext())
    assert f"parameters.{field}" in str(e.value) and fragment in str(e.value)


def test_the_decider_reads_the_named_predicted_latency_producer():
    _, cfg, _ = setup("plugins:\n- {type: predicted-latency-producer, name: lp}\n"
                      "- {type: latency-pd-decider, parameters: {latencyPredictionInfoProducerName: lp}}\n")  # fmt: skip
    decider = cfg.plugins["latency-pd-decider"]
    assert isinstance(decider, LatencyPdDecider) and decider.producer is cfg.plugins["lp"] and not decider.implied
