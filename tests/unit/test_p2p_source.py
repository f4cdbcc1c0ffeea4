"""p2p-source-producer: which peer goes in x-kv-cache-source-host-port, and when (llm-d's rule)."""

from __future__ import annotations

from dataclasses import replace

import random

import pytest

from extproc.datalayer.kv_events import BlockStored, apply_events
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.producer.p2p_source import (
    KV_CACHE_SOURCE_HEADER,
    KV_CACHE_SOURCE_P2P_PORT_HEADER,
    P2PSourceProducer,
    spread_fraction,
)
from pickers.plugins.scorer.affinity.prefix import prefix_match
from tests.unit.test_producers import A, B, C, ep, load, refused

BLOCK_TOKENS = 64  # the approximate producer's floor
PROMPT = "".join(f"{i:04d}" for i in range(4 * BLOCK_TOKENS))  # 4 blocks of 64 tokens (4 characters a token)


def config(params: str = "{}", extra: str = "") -> str:
    return (
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {blockSizeTokens: 64}\n"
        f"- type: p2p-source-producer\n  parameters: {params}\n- type: max-score-picker\n{extra}"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: max-score-picker}]\n"
    )


def request(rid: str = "r") -> InferenceRequest:
    return InferenceRequest(rid, "/v1/completions", {}, api="completions", model="m", prompt_text=PROMPT,
                            body={"model": "m", "prompt": PROMPT})  # fmt: skip


def producer(params: str = "{}", held: dict[str, int] | None = None) -> P2PSourceProducer:
    """The config's producer, its approximate index holding `held` (address -> leading blocks)."""
    cfg = load(config(params))
    p = cfg.plugins["p2p-source-producer"]
    assert isinstance(p, P2PSourceProducer)
    hashes = prefix_match(request(), CycleState(), p.index, p.source.block_chars, p.source.max_blocks).hashes
    assert len(hashes) == 4
    for address, n in (held or {}).items():
        p.index.record(address, hashes[:n], 100)
    return p


def header(p: P2PSourceProducer, candidates: list[Endpoint], chosen: Endpoint, *, prefill: Endpoint | None = None,
           rid: str = "r") -> str | None:  # fmt: skip
    """Run produce before the pick and pre_request after it (chosen = the primary)."""
    req, cycle = request(rid), CycleState()
    p.produce(req, cycle, candidates)
    result = SchedulingResult([chosen], "decode")
    if prefill is not None:
        result.profile_results = {"decode": [chosen], p.prefill_profile: [prefill]}
    p.pre_request(req, cycle, result)
    return result.request_headers.get(KV_CACHE_SOURCE_HEADER)


def test_the_peer_caching_the_most_goes_in_the_header_when_it_out_caches_the_chosen_pod():
    p = producer(held={A: 1, B: 3})
    a, b = ep(A), ep(B)
    assert header(p, [a, b], a) == B
    assert header(p, [a, b], b) is None  # the chosen pod is the best peer: nothing to pull


def test_peers_more_than_a_block_short_of_the_most_are_never_chosen():
    p = producer(held={A: 4, B: 2, C: 0})
    eps = [ep(A), ep(B), ep(C)]
    assert {header(p, eps, eps[2], rid=f"r{i}") for i in range(50)} == {A}


def test_min_cached_token_delta_suppresses_short_pulls():
    # the best peer holds 3 blocks (192 tokens), the chosen pod 1 (64): a delta of 128 tokens
    assert header(producer("{minCachedTokenDelta: 128}", {A: 1, B: 3}), [ep(A), ep(B)], ep(A)) == B
    assert header(producer("{minCachedTokenDelta: 129}", {A: 1, B: 3}), [ep(A), ep(B)], ep(A)) is None


def test_the_computing_pod_is_the_prefill_pick_when_the_prefill_profile_ran():
    p = producer(held={A: 0, B: 3, C: 1})
    a, b, c = ep(A), ep(B), ep(C)
    assert header(p, [a, b, c], a, prefill=b) is None  # the prefill pod is the best peer
    assert header(p, [a, b, c], a, prefill=c) == B  # c computes with 1 block; b holds 3
    assert header(p, [a, b, c], c) == B  # no prefill profile ran: the primary computes


def test_a_renamed_prefill_profile_is_read_under_its_name_and_else_the_primary_computes():
    p = producer("{prefillProfileName: P}", {A: 0, B: 3})
    a, b = ep(A), ep(B)
    req, cycle = request(), CycleState()
    p.produce(req, cycle, [a, b])
    result = SchedulingResult([a], "decode", profile_results={"decode": [a], "P": [b]})
    p.pre_request(req, cycle, result)
    assert KV_CACHE_SOURCE_HEADER not in result.request_headers  # P's pick (b) computes and is the best
    other = SchedulingResult([a], "decode", profile_results={"decode": [a], "prefill": [b]})
    p.pre_request(req, cycle, other)
    assert other.request_headers[KV_CACHE_SOURCE_HEADER] == B  # "prefill" is not P: the primary (a) computes


def test_no_match_in_the_producer_sets_no_header():
    p = producer(held={})
    assert header(p, [ep(A), ep(B)], ep(A)) is None


def test_equal_peers_share_pulls_by_inverse_waiting_queue():
    p = producer(held={A: 3, B: 3, C: 3})
    a, b, c = ep(A), ep(B), ep(C)
    a.metrics, b.metrics, c.metrics = (replace(e.metrics, waiting=w) for e, w in ((a, 12), (b, 2), (c, 7)))  # weights 1/13, 1/3, 1/8
    chooser = ep("10.0.0.9:8000")  # holds nothing: every pull is worth it
    rng = random.Random(7)
    picks = {A: 0, B: 0, C: 0}
    for _ in range(600):
        got = header(p, [a, b, c, chooser], chooser, rid=f"{rng.getrandbits(64):x}")
        assert got is not None
        picks[got] += 1
    assert picks[B] > picks[C] > picks[A] > 0


def test_the_choice_is_fixed_per_request_id():
    p = producer(held={A: 3, B: 3})
    eps, chooser = [ep(A), ep(B)], ep(C)
    assert len({header(p, eps, chooser, rid="same") for _ in range(10)}) == 1
    assert 0.0 <= spread_fraction("") < 1.0 and spread_fraction("a") == 0xE40C292C / 2**32  # FNV-1a 32


def test_the_precise_producer_counts_only_cpu_blocks_for_a_source():
    text = (
        "plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
        "- type: precise-prefix-cache-producer\n  parameters:\n    tokenProcessorConfig: {blockSizeTokens: 4}\n"
        "- type: p2p-source-producer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n"
        "- type: max-score-picker\n"
        "schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: max-score-picker}]\n"
    )
    cfg = load(text)
    precise, p = cfg.plugins["precise-prefix-cache-producer"], cfg.plugins["p2p-source-producer"]
    assert cfg.plugin_parameters["p2p-source-producer"]["prefixMatchInfoProducerName"] == "precise-prefix-cache-producer"
    ids = list(range(100, 116))  # 4 blocks of 4 tokens
    apply_events(precise.index, A, [BlockStored([1, 2, 3, 4], None, ids, 4)])  # all on the GPU
    apply_events(precise.index, B, [BlockStored([1, 2], None, ids[:8], 4, medium="CPU")])
    apply_events(precise.index, C, [BlockStored([1], None, ids[:4], 4)])
    req, cycle = request(), CycleState()
    req.prompt_token_ids = ids
    p.produce(req, cycle, [ep(A), ep(B), ep(C)])
    result = SchedulingResult([ep(C)], "default")
    p.pre_request(req, cycle, result)
    # A holds the most, but on the GPU: B's 2 CPU blocks (8 tokens) are the pull, C computes with 4 cached
    assert result.request_headers == {KV_CACHE_SOURCE_HEADER: B}


def _precise_p2p(kv_events: str, p2p: str) -> tuple[object, P2PSourceProducer]:
    text = (
        "plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n"
        "- type: precise-prefix-cache-producer\n  parameters:\n    tokenProcessorConfig: {blockSizeTokens: 4}\n"
        f"    kvEventsConfig: {kv_events}\n"
        f"- type: p2p-source-producer\n  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer, {p2p}}}\n"
        "- type: max-score-picker\n"
    )
    cfg = load(text)
    return cfg, cfg.plugins["p2p-source-producer"]


def _pull_headers(p: P2PSourceProducer, source_rank: int | None) -> dict[str, str]:
    """B holds 2 CPU blocks, C computes; B's global DP rank as its KV events named it (or unknown)."""
    ids = list(range(100, 116))
    assert p.precise is not None
    apply_events(p.precise.index, B, [BlockStored([1, 2], None, ids[:8], 4, medium="CPU")])
    if source_rank is not None:
        p.precise.index.set_global_dp_rank(B, source_rank)
    req, cycle = request(), CycleState()
    req.prompt_token_ids = ids
    p.produce(req, cycle, [ep(B), ep(C)])
    result = SchedulingResult([ep(C)], "default")
    p.pre_request(req, cycle, result)
    return result.request_headers


def test_p2p_port_base_names_the_source_ranks_p2p_port_from_its_global_rank():
    """llm-d: each rank's P2P tier binds p2pPortBase + its GLOBAL rank, learned from its KV events."""
    cfg, p = _precise_p2p("{servingPortBase: 8000, dataParallelSizeLocal: 2}", "p2pPortBase: 7777")
    assert not cfg.warnings
    assert _pull_headers(p, 11) == {KV_CACHE_SOURCE_HEADER: B, KV_CACHE_SOURCE_P2P_PORT_HEADER: "7788"}


def test_p2p_port_base_sets_no_port_while_the_sources_rank_is_unknown():
    _, p = _precise_p2p("{servingPortBase: 8000, dataParallelSizeLocal: 2}", "p2pPortBase: 7777")
    assert _pull_headers(p, None) == {KV_CACHE_SOURCE_HEADER: B}


def test_without_p2p_port_base_only_the_host_port_header_is_set():
    _, p = _precise_p2p("{servingPortBase: 8000}", "minCachedTokenDelta: 1")
    assert _pull_headers(p, 3) == {KV_CACHE_SOURCE_HEADER: B}


def test_p2p_port_base_that_can_never_act_loads_with_a_warning():
    """llm-d's approximate producer knows no ranks, and without servingPortBase the precise one records
    none: the port header is never set there either."""
    assert any("p2pPortBase has no effect here" in w for w in load(config("{p2pPortBase: 7777}")).warnings)
    cfg, _ = _precise_p2p("{topicFilter: kv@}", "p2pPortBase: 7777")
    assert any("p2pPortBase has no effect here" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("{minCachedTokenDelta: 0}", "minCachedTokenDelta"),
        ("{minCachedTokenDelta: x}", "minCachedTokenDelta"),
        ("{prefillProfileName: 3}", "prefillProfileName"),
        ("{prefixMatchInfoProducerName: nobody}", "prefixMatchInfoProducerName"),
        ("{prefixMatchInfoProducerName: max-score-picker}", "prefixMatchInfoProducerName"),
        ("{minCachedTokenDelta: 1, sourceHeader: x}", "sourceHeader"),
        ("{p2pPortBase: -1}", "p2pPortBase"),
        ("{p2pPortBase: 70000}", "p2pPortBase"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(params: str, field: str):
    assert field in refused(config(params))


def test_the_type_loads_and_shows_its_effective_parameters():
    cfg = load(config())
    assert dict(cfg.plugin_parameters["p2p-source-producer"]) == {
        "minCachedTokenDelta": 1, "prefillProfileName": "prefill", "p2pPortBase": 0,
        "prefixMatchInfoProducerName": "approx-prefix-cache-producer"}  # fmt: skip
    with pytest.raises(ConfigError):
        load(config("{minCachedTokenDelta: -1}"))


# Our config in the shape of llm-d's p2p-kv-cache-sharing guide (written by us): the precise KV-event match
# on 64-token blocks with a CPU tier, its scorer, and the P2P source read from the same producer.
P2P_GUIDE = """\
plugins:
- type: token-producer
  parameters: {local: {tokenizer: sim}}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 64}
    indexerConfig:
      kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.8}]
    kvEventsConfig: {topicFilter: "kv@"}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: queue-scorer
- type: max-score-picker
- type: p2p-source-producer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
    prefillProfileName: prefill
    minCachedTokenDelta: 64
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


def test_the_p2p_guide_shape_passes_check_config(tmp_path, capsys):
    from extproc.cli import main as cli
    from tests.unit.test_producers import HEADER

    cfg = load(P2P_GUIDE)
    assert not cfg.warnings and cfg.plugins["p2p-source-producer"].min_delta == 64
    path = tmp_path / "p2p-kv-cache-sharing.yaml"
    path.write_text(HEADER + P2P_GUIDE)
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "p2p-source-producer" in out and "minCachedTokenDelta" in out


def test_a_client_sent_p2p_port_header_is_removed():
    """Like the host:port header, the port is the EPP's to set: a client's own value never reaches a sidecar."""
    from extproc.datalayer.datastore import Datastore
    from extproc.handlers.request_stream import RequestStream
    from extproc.observability.metrics import EppMetrics
    from extproc.requestcontrol.director import Director
    from pickers.framework.endpoint import EndpointSpec
    from pickers.framework.scheduler import Scheduler
    from tests.unit.test_protocol import completion_body, send_request

    cfg = load(config())
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    director = Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler), EppMetrics())
    out = send_request(RequestStream(director), completion_body(), extra={KV_CACHE_SOURCE_P2P_PORT_HEADER: "22"})
    mutation = out[0].request_headers.response.header_mutation
    assert KV_CACHE_SOURCE_P2P_PORT_HEADER in mutation.remove_headers
    assert all(h.header.key != KV_CACHE_SOURCE_P2P_PORT_HEADER for h in mutation.set_headers)
