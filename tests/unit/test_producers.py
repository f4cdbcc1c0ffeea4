"""llm-d's data producers: token-producer, precise-prefix-cache-producer, inflight-load-producer and
session-id-producer, each configured as llm-d configures it, and what reads what they produce."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import (
    BlockStored,
    KVEventSubscriber,
    apply_events,
    topic_endpoint,
)
from extproc.handlers.request_stream import RequestStream, State
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from extproc.requestcontrol.render import VllmRenderClient
from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.indexes.tokenization import sim_chat_template, sim_encode
from pickers.plugins.base import PluginContext
from pickers.plugins.producer.session import SessionIDProducer, cookie_value
from pickers.plugins.producer.tokens import Rendered, TokenProducer
from pickers.plugins.scorer.affinity.precise_prefix import (
    SCORER_DEPRECATION,
    PrecisePrefixCacheProducer,
)
from pickers.plugins.scorer.affinity.session_affinity import SessionAffinityScorer
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer
from tests.unit.fake_director import FakeDirector
from tests.unit.test_precise_prefix import hf_dir  # noqa: F401 - the fixture: a tiny trained HF tokenizer
from tests.unit.test_protocol import (
    body_msg,
    completion_body,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def load(text: str, ctx: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + text, "test.yaml", ctx or PluginContext(ApproxPrefixIndex(), random.Random(0)))


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(text)
    return str(e.value)


def ep(address: str) -> Endpoint:
    host, port = address.split(":")
    return Endpoint(EndpointSpec(address, host, int(port)))


def completion(prompt: str | list[int], **extra: object) -> InferenceRequest:
    text = prompt if isinstance(prompt, str) else ""
    return InferenceRequest("r", "/v1/completions", {}, api="completions", model="m", prompt_text=text,
                            body={"model": "m", "prompt": prompt, **extra}, max_tokens=extra.get("max_tokens"))  # type: ignore[arg-type]


def chat(text: str) -> InferenceRequest:
    messages = [{"role": "user", "content": text}]
    return InferenceRequest("r", "/v1/chat/completions", {}, api="chat", model="m", prompt_text=f"<|user|>\n{text}\n",
                            body={"model": "m", "messages": messages})


# -- token-producer ------------------------------------------------------------------------------
def test_the_default_token_producer_estimates_and_sets_no_ids():
    cfg = load("plugins:\n- type: token-producer\n- type: max-score-picker\n")
    tp = cfg.plugins["token-producer"]
    assert isinstance(tp, TokenProducer) and tp.token_backend == "estimate"
    shown = cfg.plugin_parameters["token-producer"]
    assert list(shown) == ["estimate"] and shown["estimate"]["image"]["dynamic"] == {"factor": 1024}  # llm-d's defaults
    req = completion("x" * 400)
    tp.produce(req, CycleState(), [])
    assert req.prompt_token_ids is None and req.prompt_tokens == 100 and not tp.needs_io(req)


def test_token_ids_given_in_the_prompt_are_taken_as_they_are():
    tp = TokenProducer()
    req = completion([5, 6, 7])
    tp.produce(req, CycleState(), [])
    assert req.prompt_token_ids == [5, 6, 7] and req.prompt_tokens == 3
    batch = completion([[1, 2], [3]])
    tp.produce(batch, CycleState(), [])
    assert batch.prompt_token_ids == [1, 2, 3]


def test_the_local_sim_tokenizer_tokenizes_inline_like_the_simulator():
    cfg = load("plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n- type: max-score-picker\n")
    tp = cfg.plugins["token-producer"]
    assert tp.token_backend == "local" and cfg.plugin_parameters["token-producer"] == {"local": {"tokenizer": "sim", "timeout": "5s"}}
    req = chat("hello there, a chat")
    assert not tp.needs_io(req)  # the simulator's tokenizer costs nothing to wait for
    tp.produce(req, CycleState(), [])
    assert req.prompt_token_ids == sim_encode(sim_chat_template([("user", "hello there, a chat")]).encode())
    assert req.prompt_tokens == len(req.prompt_token_ids)


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ("{vllm: {url: 'http://x:8000'}}", "modelName", "is required with vllm"),
        ("{modelName: m, vllm: {url: 'https://x'}}", "vllm.url", "TLS is not supported"),
        ("{modelName: m, vllm: {timeout: soon}}", "vllm.timeout", "expected a duration"),
        ("{modelName: m, estimate: {}}", "vllm", "only one of estimate, vllm"),
        ("{estimate: {image: {mode: fixed}}}", "estimate.image.mode", "expected one of dynamic, static"),
        ("{local: {}}", "local.tokenizer", "is required"),
        ("{local: {tokenizer: /nonexistent/tok}}", "local.tokenizer", "cannot load a tokenizer"),
        ("{vllm: {url: 'http://x', retries: 3}, modelName: m}", "vllm.retries", "unknown parameter; vllm takes"),
    ],
)
def test_bad_token_producer_settings_are_refused_naming_the_field(params: str, field: str, fragment: str):
    msg = refused(f"plugins:\n- type: token-producer\n  parameters: {params}\n- type: max-score-picker\n")
    assert f"plugins[0].parameters.{field}" in msg and fragment in msg


def test_the_old_name_tokenizer_loads_with_llm_ds_deprecation():
    cfg = load("plugins:\n- type: tokenizer\n  parameters: {modelName: m}\n- type: max-score-picker\n")
    tp = cfg.plugins["tokenizer"]
    assert isinstance(tp, TokenProducer) and tp.token_backend == "vllm" and tp.url == "http://localhost:8000"
    assert any("tokenizer is deprecated: use token-producer" in w for w in cfg.warnings)


async def _sim():  # type: ignore[no-untyped-def]
    from vllm_sim.config import SimConfig
    from vllm_sim.server import SimServer

    return SimServer(SimConfig.from_profile("gpu", time_scale=0.01))


async def test_the_vllm_backend_gets_the_servers_own_token_ids_from_its_render_endpoints():
    from vllm_sim import tokens

    async with await _sim() as sim:
        tp = TokenProducer(backend="vllm", model_name="sim-model", url=sim.url, timeout=5.0)
        client = tp.renderer = VllmRenderClient(sim.url)
        try:
            req = completion("the prompt the server tokenizes")
            assert tp.needs_io(req)
            await tp.prepare(req)
            assert req.prompt_token_ids == tokens.encode("the prompt the server tokenizes")
            conversation = chat("and a chat, with its template")
            await tp.prepare(conversation)
            assert conversation.prompt_token_ids == tokens.encode(tokens.apply_chat_template([("user", "and a chat, with its template")], True))
            assert sim.render_calls == 2 and not tp.fallbacks
        finally:
            await client.close()


async def test_a_render_call_that_hangs_costs_the_timeout_once_then_the_estimate(caplog):
    import aiohttp

    async with await _sim() as sim:
        async with aiohttp.ClientSession() as http:
            await http.post(f"{sim.control_url}/sim/fault", json={"mode": "hang"})
        tp = TokenProducer(backend="vllm", model_name="sim-model", url=sim.url, timeout=0.2)
        client = tp.renderer = VllmRenderClient(sim.url)
        try:
            with caplog.at_level(logging.WARNING, "pickers.plugins.producer.tokens"):
                for _ in range(2):
                    req = completion("y" * 40)
                    await asyncio.wait_for(tp.prepare(req), 5.0)  # never a hang: the producer's own timeout
                    assert req.prompt_token_ids is None and req.prompt_tokens == 10  # the estimate
            assert tp.fallbacks == {"timeout": 2}
            assert len([r for r in caplog.records if "timeout" in r.getMessage() or "no tokens" in r.getMessage()]) == 1
        finally:
            await client.close()


async def test_a_render_error_or_an_unreachable_server_falls_back_to_the_estimate():
    import aiohttp

    async with await _sim() as sim:
        async with aiohttp.ClientSession() as http:
            await http.post(f"{sim.control_url}/sim/fault", json={"mode": "error"})
        tp = TokenProducer(backend="vllm", model_name="sim-model", url=sim.url)
        client = tp.renderer = VllmRenderClient(sim.url)
        try:
            req = completion("z" * 40)
            await tp.prepare(req)
            assert req.prompt_token_ids is None and tp.fallbacks == {"RenderError": 1}
        finally:
            await client.close()
    gone = TokenProducer(backend="vllm", model_name="m", url="http://127.0.0.1:9")
    gone.renderer = VllmRenderClient("http://127.0.0.1:9")
    req = completion("w" * 40)
    await gone.prepare(req)
    assert req.prompt_token_ids is None and gone.fallbacks == {"RenderError": 1}
    await gone.renderer.close()  # type: ignore[attr-defined]


def test_the_fallbacks_are_a_metric():
    tp = TokenProducer("tok", backend="vllm", model_name="m")
    tp.fallbacks["timeout"] = 3
    m = EppMetrics(pool_name="p", version="t")
    m.attach_precise([tp])
    assert 'llm_epp_token_producer_fallbacks_total{plugin_name="tok",reason="timeout"} 3.0' in m.exposition().decode()


async def test_the_simulators_tokenize_endpoint_has_vllms_shape():
    import aiohttp

    from vllm_sim import tokens

    async with await _sim() as sim, aiohttp.ClientSession() as http:
        async with http.post(f"{sim.url}/tokenize", json={"model": "sim-model", "prompt": "count my tokens"}) as r:
            body = await r.json()
        assert body == {"count": len(tokens.encode("count my tokens")), "max_model_len": sim.config.max_model_len,
                        "tokens": tokens.encode("count my tokens"), "token_strs": None}  # fmt: skip
        async with http.post(f"{sim.url}/tokenize", json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert (await r.json())["tokens"] == tokens.encode(tokens.apply_chat_template([("user", "hi")], True))
        async with http.post(f"{sim.url}/tokenize", json={"model": "sim-model"}) as r:
            assert r.status == 400
        async with http.post(f"{sim.url}/v1/completions/render", json={"model": "sim-model", "prompt": ["a b", "c d"]}) as r:
            rendered = await r.json()
        assert [g["token_ids"] for g in rendered] == [tokens.encode("a b"), tokens.encode("c d")]


# -- waiting for the tokens before the pick (RequestStream's PREPARING) ----------------------------
def test_a_request_waits_in_preparing_until_resumed():
    director = FakeDirector(prepare_first=True)
    stream = RequestStream(director)
    assert stream.handle(headers_msg()) == []
    assert stream.handle(body_msg(completion_body(), True)) == []
    assert stream.state is State.PREPARING and stream.needs_data and not director.routed
    out = stream.resume()
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    assert stream.state is State.ROUTED and len(director.routed) == 1


def test_trailers_that_end_the_body_are_answered_after_the_resumed_pick():
    stream = RequestStream(FakeDirector(prepare_first=True))
    stream.handle(headers_msg())
    stream.handle(body_msg(completion_body(), False))
    assert stream.handle(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())) == []
    out = stream.resume()
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]


def test_a_message_while_preparing_is_a_protocol_error_and_an_abort_settles_nothing():
    from extproc.handlers.request_stream import ProtocolError

    director = FakeDirector(prepare_first=True)
    stream = RequestStream(director)
    stream.handle(headers_msg())
    stream.handle(body_msg(completion_body(), True))
    with pytest.raises(ProtocolError, match="preparing"):
        stream.handle(body_msg(b"more", True))
    stream.close()
    assert director.outcomes == [] and director.in_flight == 0


def _director(cfg: EndpointPickerConfig, addrs=(A, B)) -> Director:  # type: ignore[no-untyped-def]
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in addrs)
    scheduler = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    tps = [p for p in cfg.producers if isinstance(p, TokenProducer)]
    return Director(ds, scheduler, EppMetrics(), token_producers=tps)


async def test_the_director_awaits_the_tokens_and_counts_them_in_flight():
    cfg = load("plugins:\n- type: token-producer\n  parameters: {modelName: m}\n- type: token-load-scorer\n- type: max-score-picker\n")
    tp = cfg.plugins["token-producer"]

    class Renderer:
        async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered:
            assert model == "m"
            return Rendered(list(range(37)))

    tp.renderer = Renderer()
    director = _director(cfg)
    stream = RequestStream(director)
    stream.handle(headers_msg())
    assert stream.handle(body_msg(completion_body(prompt="short", max_tokens=3), True)) == []
    assert stream.needs_data
    await director.prepare(stream.request)  # type: ignore[arg-type]
    stream.resume()
    assert stream.request.prompt_token_ids == list(range(37))  # type: ignore[union-attr]
    # the token-load-scorer's in-flight load is the (uncached) tokens the server counted, not characters / 4
    assert sum(e.in_flight_load_tokens for e in director.datastore.candidates()) == 37


# -- precise-prefix-cache-producer -------------------------------------------------------------------
# Our own config in the shape of llm-d's precise prefix-cache guide: the model server's tokens, the
# precise producer, and the generic prefix-cache-scorer reading it by name.
PRECISE_GUIDE = """\
plugins:
- type: token-producer
  parameters:
    modelName: guide-model
    vllm:
      url: http://127.0.0.1:8200
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig:
      blockSizeTokens: 4
    indexerConfig:
      kvBlockIndexConfig:
        inMemoryConfig: {size: 1000, podCacheSize: 2}
    kvEventsConfig:
      topicFilter: "kv@"
      podDiscoveryConfig: {socketPort: 5600}
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
    weight: 2
  - pluginRef: max-score-picker
"""


def test_the_precise_guide_shape_loads_and_the_prefix_scorer_reads_the_precise_match():
    cfg = load(PRECISE_GUIDE)
    producer = cfg.plugins["precise-prefix-cache-producer"]
    scorer = cfg.plugins["prefix-cache-scorer"]
    assert isinstance(producer, PrecisePrefixCacheProducer) and scorer.precise is producer
    assert producer.token_source is cfg.plugins["token-producer"] and producer.real_tokens
    assert (producer.block_size, producer.kv_events_port, producer.topic_filter, producer.discover_pods) == (4, 5600, "kv@", True)
    assert (producer.index.max_keys, producer.index.pods_per_key) == (1000, 2)
    assert cfg.producers[0] is cfg.plugins["token-producer"] and producer in cfg.producers
    assert not cfg.warnings
    ids = list(range(100, 116))  # 4 blocks of 4
    apply_events(producer.index, A, [BlockStored([1, 2, 3, 4], None, ids, 4)])
    apply_events(producer.index, B, [BlockStored([9], None, ids[:4], 4)])
    req = completion("ignored: the tokens come from the token-producer")
    req.prompt_token_ids = ids
    assert scorer.score(req, CycleState(), [ep(A), ep(B), ep(C)]) == [1.0, 0.25, 0.0]
    result = SchedulingResult([ep(A)])
    scorer.pre_request(req, CycleState(), result)
    assert scorer.index.size() == 0  # nothing recorded in the approximate index


def test_the_precise_producers_effective_parameters_are_llm_ds_with_defaults():
    params = load(PRECISE_GUIDE).plugin_parameters["precise-prefix-cache-producer"]
    assert params["tokenProcessorConfig"] == {"blockSizeTokens": 4, "hashSeed": "", "hashAlgorithm": "cbor-fnv"}
    assert params["kvEventsConfig"] == {"zmqEndpoint": "", "topicFilter": "kv@", "concurrency": 4, "engineType": "vllm",
                                        "discoverPods": True, "servingPortBase": 0, "dataParallelSizeLocal": 1,
                                        "podDiscoveryConfig": {"socketPort": 5600, "dataParallelSizeTotal": 1}}  # fmt: skip
    assert params["indexerConfig"]["kvBlockIndexConfig"] == {"inMemoryConfig": {"size": 1000, "podCacheSize": 2}, "enableMetrics": False,
                                                             "metricsLoggingInterval": None}  # fmt: skip
    assert (params["speculativeIndexing"], params["speculativeTTL"]) == (False, "2s")


def test_check_config_prints_the_producers_effective_parameters(tmp_path, capsys):
    from extproc.cli import main as cli

    path = tmp_path / "precise.yaml"
    path.write_text(HEADER + PRECISE_GUIDE)
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert '    token-producer: modelName=guide-model, vllm={"url":"http://127.0.0.1:8200","timeout":"5s","mmTimeout":"30s"}' in out
    assert '    precise-prefix-cache-producer: tokenProcessorConfig={"blockSizeTokens":4,' in out
    assert "    prefix-cache-scorer: prefixMatchInfoProducerName=precise-prefix-cache-producer, matchLengthWeight=0.0" in out


def test_a_precise_producer_without_real_tokens_warns_that_it_cannot_match():
    cfg = load("plugins:\n- type: precise-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: "
               "{prefixMatchInfoProducerName: precise-prefix-cache-producer}\n- type: max-score-picker\n")  # fmt: skip
    assert any("estimated tokens never match" in w for w in cfg.warnings)
    cfg = load("plugins:\n- type: token-producer\n- type: precise-prefix-cache-producer\n- type: max-score-picker\n")
    assert any("estimated tokens never match" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ("{indexerConfig: {tokenizersPoolConfig: {hf: {}}}}", "indexerConfig.tokenizersPoolConfig", "configure a token-producer"),
        ("{indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: 'r:6379'}}}}", "indexerConfig.kvBlockIndexConfig.redisConfig", "no Redis"),
        ("{indexerConfig: {kvBlockIndexConfig: {costAwareMemoryConfig: {size: 2GiB}}}}", "costAwareMemoryConfig", "in-memory index"),
        ("{indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: soon}}}", "kvBlockIndexConfig.metricsLoggingInterval",
         "expected nanoseconds"),
        ("{indexerConfig: {kvCacheBackendConfigs: [{name: gpu, weight: 2}]}}", "indexerConfig.kvCacheBackendConfigs[0].weight", "from 0.0 to 1.0"),
        ("{kvEventsConfig: {engineType: trtllm}}", "kvEventsConfig.engineType", "expected one of vllm, sglang"),
        ("{kvEventsConfig: {servingPortBase: 65530, dataParallelSizeLocal: 8}}", "kvEventsConfig.servingPortBase",
         "past the last port"),
        ("{kvEventsConfig: {servingPortBase: -1}}", "kvEventsConfig.servingPortBase", "expected an integer >= 0"),
        ("{kvEventsConfig: {podDiscoveryConfig: {dataParallelSizeTotal: two}}}", "podDiscoveryConfig.dataParallelSizeTotal",
         "expected an integer"),
        ("{kvEventsConfig: {podDiscoveryConfig: {replaySocketPort: 5558}}}", "replaySocketPort", "replaying missed events"),
        ("{tokenProcessorConfig: {hashAlgorithm: sha256}}", "tokenProcessorConfig.hashAlgorithm", "cbor-fnv or xxh64"),
        ("{speculativeTTL: later}", "speculativeTTL", "expected a duration"),
        ("{kvEventsConfig: {topicfilter: x}}", "kvEventsConfig.topicfilter", "unknown parameter"),
    ],
)
def test_what_the_precise_producer_cannot_honour_is_refused_with_the_reason(params: str, field: str, fragment: str):
    msg = refused(f"plugins:\n- type: precise-prefix-cache-producer\n  parameters: {params}\n- type: max-score-picker\n")
    assert field in msg and fragment in msg


def test_llm_ds_parameters_that_change_nothing_here_load_with_a_warning():
    cfg = load("plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n- type: precise-prefix-cache-producer\n"
               "  parameters: {tokenProcessorConfig: {blockSize: 32}, kvEventsConfig: {concurrency: 8, podDiscoveryConfig: "
               "{podLabelSelector: app=vllm}}, indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: 1000000000}}}\n"
               "- type: max-score-picker\n")  # fmt: skip
    said = " | ".join(cfg.warnings)
    for fragment in ("tokenProcessorConfig.blockSize is deprecated", "concurrency has no effect",
                     "podLabelSelector is deprecated and has no effect", "metricsLoggingInterval has no effect without enableMetrics"):  # fmt: skip
        assert fragment in said
    assert cfg.plugins["precise-prefix-cache-producer"].block_size == 32


def test_the_hash_seed_seeds_the_keys_and_matching_still_works():
    seeded = KVBlockIndex(hash_seed="42")
    ids = list(range(8))
    assert request_keys(ids, 4, 8, None, "42") != request_keys(ids, 4, 8)
    apply_events(seeded, A, [BlockStored([1, 2], None, ids, 4)])
    assert seeded.match(request_keys(ids, 4, 8, None, "42")) == {A: 2}
    assert seeded.match(request_keys(ids, 4, 8)) == {}


def test_the_in_memory_bounds_drop_the_least_recently_stored_first():
    per_key = KVBlockIndex(pods_per_key=2)
    ids = list(range(4))
    for address in (A, B, C):  # C stores last: A, the oldest holder, goes
        apply_events(per_key, address, [BlockStored([7], None, ids, 4)])
    assert per_key.match(request_keys(ids, 4, 1)) == {B: 1, C: 1}
    few = KVBlockIndex(max_keys=2)
    apply_events(few, A, [BlockStored([1, 2, 3], None, list(range(12)), 4)])
    keys = request_keys(list(range(12)), 4, 3)
    assert [bool(few.match([k])) for k in keys] == [False, True, True] and few.match(keys) == {}


def test_speculative_entries_route_the_next_request_until_the_ttl_runs_out():
    now = [100.0]
    cfg = load("plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n- type: precise-prefix-cache-producer\n"
               "  parameters: {speculativeIndexing: true, speculativeTTL: 2s, tokenProcessorConfig: {blockSizeTokens: 4}}\n"
               "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n"
               "- type: max-score-picker\n")  # fmt: skip
    producer = cfg.plugins["precise-prefix-cache-producer"]
    producer._clock = lambda: now[0]
    scorer = cfg.plugins["prefix-cache-scorer"]
    req = completion("q" * 64)
    req.prompt_token_ids = list(range(16))
    cycle = CycleState()
    assert scorer.score(req, cycle, [ep(A), ep(B)]) == [0.0, 0.0]
    producer.pre_request(req, cycle, SchedulingResult([ep(B)]))
    assert producer.speculative_entries() == 4
    assert scorer.score(req, CycleState(), [ep(A), ep(B)]) == [0.0, 1.0]
    now[0] += 2.5
    assert scorer.score(req, CycleState(), [ep(A), ep(B)]) == [0.0, 0.0] and producer.speculative_entries() == 0


def test_match_length_weight_follows_llm_ds_formula():
    cfg = load(PRECISE_GUIDE.replace("prefixMatchInfoProducerName: precise-prefix-cache-producer",
                                     "prefixMatchInfoProducerName: precise-prefix-cache-producer\n    matchLengthWeight: 0.5\n"
                                     "    matchLengthScaleTokens: 8"))  # fmt: skip
    producer, scorer = cfg.plugins["precise-prefix-cache-producer"], cfg.plugins["prefix-cache-scorer"]
    ids = list(range(16))
    apply_events(producer.index, A, [BlockStored([1], None, ids[:4], 4)])
    req = completion("x")
    req.prompt_token_ids = ids
    (score,) = scorer.score(req, CycleState(), [ep(A)])
    assert score == pytest.approx(0.5 * min(1.0, 4 / 8) ** 2 + 0.5 * 1 / 4)
    assert "must be between 0.0 and 1.0" in refused("plugins:\n- type: prefix-cache-scorer\n  parameters: {matchLengthWeight: 2}\n")


def test_no_hit_lru_reads_the_precise_match_when_it_names_the_producer():
    cfg = load(PRECISE_GUIDE.replace("schedulingProfiles:", "- type: no-hit-lru-scorer\n  parameters: "
                                     "{prefixMatchInfoProducerName: precise-prefix-cache-producer}\nschedulingProfiles:"))
    producer, lru = cfg.plugins["precise-prefix-cache-producer"], cfg.plugins["no-hit-lru-scorer"]
    assert lru.precise is producer
    req = completion("x")
    req.prompt_token_ids = list(range(8))
    assert lru.score(req, CycleState(), [ep(A), ep(B)]) == [1.0, 1.0]  # cold: nobody holds the first block
    apply_events(producer.index, B, [BlockStored([1], None, list(range(4)), 4)])
    assert lru.score(req, CycleState(), [ep(A), ep(B)]) == [0.5, 0.5]  # warm: no opinion


def test_the_old_precise_scorer_takes_the_producers_parameters_with_llm_ds_deprecation():
    cfg = load("plugins:\n- type: token-producer\n  parameters: {local: {tokenizer: sim}}\n- type: precise-prefix-cache-scorer\n"
               "  parameters: {tokenProcessorConfig: {blockSizeTokens: 4}, kvEventsConfig: {discoverPods: false}}\n"
               "- type: max-score-picker\n")  # fmt: skip
    scorer = cfg.plugins["precise-prefix-cache-scorer"]
    assert scorer.tokenize is None and scorer.real_tokens and not scorer.subscribe
    assert any(w.endswith(SCORER_DEPRECATION) for w in cfg.warnings)
    assert SCORER_DEPRECATION == ("DEPRECATION: precise-prefix-cache-scorer is deprecated; configure precise-prefix-cache-producer + "
                                  "prefix-cache-scorer with prefixMatchInfoProducerName: precise-prefix-cache-producer")  # llm-d's words
    assert any("no KV events feed this index" in w for w in cfg.warnings)
    assert "not supported" in refused("plugins:\n- type: precise-prefix-cache-scorer\n  parameters: {tokenizer: sim, "
                                      "kvEventsConfig: {}}\n- type: max-score-picker\n")  # fmt: skip


def test_a_bound_socket_attributes_each_message_to_the_endpoint_its_topic_names():
    import msgspec

    assert topic_endpoint(b"kv@10.0.0.1:8000@my-model") == A and topic_endpoint(b"kv@") is None
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    index = KVBlockIndex()
    sub = KVEventSubscriber(ds, index, per_endpoint=False, bind="tcp://127.0.0.1:0", topic_filter="kv@")
    event = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3, 4], "block_size": 4}
    payload = msgspec.msgpack.encode([0.0, [event], None])
    sub.handle_bound_message([b"kv@10.0.0.1:8000@m", (0).to_bytes(8, "big"), payload])
    sub.handle_bound_message([b"kv@10.9.9.9:8000@m", (0).to_bytes(8, "big"), payload])  # not in the pool: dropped
    assert index.blocks_of(A) == 1 and index.blocks_of("10.9.9.9:8000") == 0 and sub.unknown_sources == 1


async def test_engines_that_connect_to_the_bound_socket_feed_the_index():
    import msgspec
    import zmq
    import zmq.asyncio

    from extproc.devstack.ports import reserve_port

    held = reserve_port()  # held while the subscriber binds it (ZMQ binds with SO_REUSEADDR)
    port = held.port
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    index = KVBlockIndex()
    sub = KVEventSubscriber(ds, index, per_endpoint=False, bind=f"tcp://127.0.0.1:{port}", topic_filter="kv@")
    task = asyncio.create_task(sub.run())
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(f"tcp://127.0.0.1:{port}")
    event = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [1, 2, 3, 4], "block_size": 4}
    try:
        for seq in range(200):
            await pub.send_multipart([b"kv@10.0.0.1:8000@m", seq.to_bytes(8, "big"), msgspec.msgpack.encode([0.0, [event], None])])
            if index.blocks_of(A):
                break
            await asyncio.sleep(0.02)
        assert index.blocks_of(A) == 1
    finally:
        pub.close(linger=0)
        ctx.destroy(linger=0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        held.close()


# -- inflight-load-producer ------------------------------------------------------------------------------
def test_in_flight_tokens_are_the_uncached_prompt_released_at_the_first_byte():
    cfg = load("plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n- type: inflight-load-producer\n"
               "- type: token-load-scorer\n- type: max-score-picker\n")  # fmt: skip
    producer = cfg.plugins["inflight-load-producer"]
    assert producer.source is cfg.plugins["approx-prefix-cache-producer"] and producer in cfg.producers
    director = _director(cfg, addrs=(A,))
    prompt = "p" * 4096  # 1024 tokens (estimated): 4 blocks of 256 characters (64 tokens)
    for expected in (1024, 0):  # the second time the whole prompt is cached there
        stream = RequestStream(director)
        stream.handle(headers_msg())
        stream.handle(body_msg(completion_body(prompt=prompt, max_tokens=50, stream=True), True))
        (e,) = director.datastore.candidates()
        assert (e.in_flight, e.in_flight_load_tokens) == (1, expected)
        stream.handle(response_headers_msg(ctype="text/event-stream"))
        stream.handle(response_body_msg(b"data: {}\n\n", False))
        assert (e.in_flight, e.in_flight_load_tokens) == (1, 0)  # the prompt part comes off at the first byte
        stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
        assert (e.in_flight, e.in_flight_load_tokens, e.in_flight_tokens) == (0, 0, 0)


def test_estimated_output_tokens_count_until_the_end_capped_by_max_tokens_and_the_limit():
    producer = InFlightLoadProducer(ApproxPrefixIndex(), add_output=True, output_ratio=1.5, max_output=100)
    assert producer.estimate_output(40, None) == 60 and producer.estimate_output(40, 10) == 10
    assert producer.estimate_output(1000, None) == 100 and producer.estimate_output(0, None) == 0
    cfg = load("plugins:\n- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: true, outputRatio: 2}\n"
               "- type: token-load-scorer\n  parameters: {queueThresholdTokens: 1000}\n- type: max-score-picker\n")  # fmt: skip
    assert not cfg.warnings
    director = _director(cfg, addrs=(A,))
    stream = RequestStream(director)
    stream.handle(headers_msg())
    stream.handle(body_msg(completion_body(prompt="x" * 400, stream=True, max_tokens=1000), True))  # 100 tokens, 200 out
    (e,) = director.datastore.candidates()
    assert (e.in_flight_prefill_tokens, e.in_flight_output_tokens) == (100, 200)
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b"data: {}\n\n", False))
    assert (e.in_flight_prefill_tokens, e.in_flight_output_tokens) == (0, 200)  # the output stays to the end
    scorer = cfg.plugins["token-load-scorer"]
    assert scorer.score(completion(""), CycleState(), [e]) == [1.0 - 200 / 1000]
    stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
    assert (e.in_flight, e.in_flight_output_tokens) == (0, 0)


def test_a_prefill_endpoint_counts_the_request_and_its_prompt_until_the_first_byte():
    producer = InFlightLoadProducer(ApproxPrefixIndex())
    decode, prefill = ep(A), ep(B)
    result = SchedulingResult([decode], profile_results={"decode": [decode], "prefill": [prefill]})
    producer.pre_request(completion("x" * 80), CycleState(), result)
    charges = {c.endpoint.address: c for c in result.in_flight}  # type: ignore[union-attr]
    assert (charges[A].early_tokens, charges[A].early_request, charges[A].tokens) == (20, False, 0)
    assert (charges[B].early_tokens, charges[B].early_request, charges[B].requests) == (20, True, 1)
    before = list(result.in_flight)  # type: ignore[arg-type]
    producer.pre_request(completion("x" * 80), CycleState(), result)  # a second reader asks: charged once
    assert result.in_flight == before


def test_the_in_flight_discount_can_come_from_the_precise_match():
    cfg = load(PRECISE_GUIDE.replace("schedulingProfiles:", "- type: inflight-load-producer\n  parameters: "
                                     "{prefixMatchInfoProducerName: precise-prefix-cache-producer}\nschedulingProfiles:"))
    producer, precise = cfg.plugins["inflight-load-producer"], cfg.plugins["precise-prefix-cache-producer"]
    assert producer.precise is precise
    assert cfg.plugin_parameters["inflight-load-producer"]["prefixMatchInfoProducerName"] == "precise-prefix-cache-producer"
    ids = list(range(20))
    apply_events(precise.index, A, [BlockStored([1, 2, 3], None, ids[:12], 4)])
    req = completion("x")
    req.prompt_token_ids = ids
    assert producer.request_tokens(req, CycleState(), [ep(A), ep(B)]) == [20 - 12, 20]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [("{outputRatio: -1}", "expected a number >= 0"), ("{maxEstimatedOutputTokens: -5}", "expected an integer >= 0"),
     ("{prefixMatchInfoProducerName: nope}", "no plugin named 'nope'"), ("{tokenLimit: 3}", "unknown parameter")],
)
def test_bad_inflight_settings_are_refused(params: str, fragment: str):
    assert fragment in refused(f"plugins:\n- type: inflight-load-producer\n  parameters: {params}\n- type: max-score-picker\n")


# -- session-id-producer and its reader -----------------------------------------------------------------
def test_the_session_id_comes_from_the_header_or_the_cookie():
    by_header = SessionIDProducer(header="X-Session-ID")
    req = InferenceRequest("r", "/v1/completions", {"x-session-id": "  s-1 "})
    by_header.produce(req, CycleState(), [])
    assert req.attributes == {("SessionIDDataKey", "session-id-producer"): "s-1"}
    by_cookie = SessionIDProducer("sid", cookie="llm-d-session")
    req = InferenceRequest("r", "/v1/completions", {"cookie": "a=1; llm-d-session=abc; b=2"})
    by_cookie.produce(req, CycleState(), [])
    assert req.attributes == {("SessionIDDataKey", "sid"): "abc"}
    empty = InferenceRequest("r", "/v1/completions", {})
    by_header.produce(empty, CycleState(), [])
    assert empty.attributes == {} and cookie_value("a=1", "b") == ""


@pytest.mark.parametrize("params", ["{}", "{headerName: a, cookieName: b}", "{headerName: ''}"])
def test_exactly_one_source_of_the_session_id_is_required(params: str):
    assert "exactly one of headerName and cookieName" in refused(
        f"plugins:\n- type: session-id-producer\n  parameters: {params}\n- type: max-score-picker\n")


SESSION_CONFIG = """\
plugins:
- type: session-id-producer
  parameters: {cookieName: chat}
- type: session-affinity-scorer
  parameters:
    strategy: session_id
    sessionIdConfig:
      sources:
      - header: x-session-id
      - {attribute: SessionIDDataKey, producer: session-id-producer}
      evictionTtlSeconds: 60
- type: max-score-picker
"""


def test_session_affinity_pins_a_session_the_producer_found():
    cfg = load(SESSION_CONFIG)
    producer, scorer = cfg.plugins["session-id-producer"], cfg.plugins["session-affinity-scorer"]
    now = [0.0]
    scorer._clock = lambda: now[0]
    a, b = ep(A), ep(B)

    def request() -> InferenceRequest:
        req = InferenceRequest("r", "/v1/completions", {"cookie": "chat=c-7"})
        producer.produce(req, CycleState(), [a, b])
        return req

    assert scorer.score(request(), CycleState(), [a, b]) == [0.0, 0.0]  # unbound: no preference
    scorer.pre_request(request(), CycleState(), SchedulingResult([b]))
    assert scorer.score(request(), CycleState(), [a, b]) == [0.0, 1.0]
    scorer.pre_request(request(), CycleState(), SchedulingResult([a]))  # the picker went elsewhere: the binding stays
    assert scorer.score(request(), CycleState(), [a, b]) == [0.0, 1.0]
    cycle = CycleState()
    assert scorer.score(request(), cycle, [a]) == [0.0]  # its endpoint is not a candidate ...
    scorer.pre_request(request(), cycle, SchedulingResult([a]))  # ... so the session moves
    assert scorer.score(request(), CycleState(), [a, b]) == [1.0, 0.0]
    now[0] += 61
    assert scorer.score(request(), CycleState(), [a, b]) == [0.0, 0.0]  # unused past the TTL


def test_session_affinity_strategy_settings_and_refusals():
    cfg = load("plugins:\n- type: session-affinity-scorer\n  parameters: {profileName: prefill, encodedEndpointHeaderConfig: "
               "{header: X-Session-Token-Prefill}, sessionIdConfig: {}}\n- type: max-score-picker\n")  # fmt: skip
    scorer = cfg.plugins["session-affinity-scorer"]
    assert isinstance(scorer, SessionAffinityScorer) and scorer.header == "x-session-token-prefill"
    assert any("sessionIdConfig is deprecated and has no effect" in w for w in cfg.warnings)
    result = SchedulingResult([ep(A)], profile_results={"decode": [ep(A)], "prefill": [ep(B)]})
    scorer.pre_request(InferenceRequest("r", "/", {}), CycleState(), result)
    assert result.response_headers == {"x-session-token-prefill": "MTAuMC4wLjI6ODAwMA=="}  # the prefill pick, base64
    base = "plugins:\n- type: session-affinity-scorer\n  parameters: {strategy: session_id, sessionIdConfig: {sources: [%s]}}\n"
    assert "exactly one of header or attribute" in refused(base % "{header: a, attribute: b}")
    assert "unknown field" in refused(base % "{cookie: a}")
    assert "expected encoded_endpoint_header or session_id" in refused(
        "plugins:\n- type: session-affinity-scorer\n  parameters: {strategy: sticky}\n")


# -- llm-d's current precise prefix-cache routing guide, in our own config ---------------------------------
# (the producer is an extractor of the endpoint-notification-source, as the guide wires it: the EPP
# subscribes it to each endpoint of the pool as endpoints come and go)
PRECISE_ROUTING_GUIDE = """\
plugins:
- type: token-producer
  parameters:
    modelName: Qwen/Qwen3-32B
    vllm: {url: "http://render-svc:8000"}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 64}
    speculativeIndexing: true
    indexerConfig:
      kvBlockIndexConfig: {enableMetrics: true}
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 8
      discoverPods: true
      podDiscoveryConfig: {socketPort: 5556}
- type: inflight-load-producer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: prefix-cache-affinity-filter
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
    peakPrefillThroughput: 2000
- type: token-load-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: token-load-scorer
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors:
    - pluginRef: precise-prefix-cache-producer
"""


def test_the_precise_routing_guide_shape_loads_with_every_reader_on_the_precise_match():
    from pickers.framework.types import EndpointExtractor

    cfg = load(PRECISE_ROUTING_GUIDE)
    precise = cfg.plugins["precise-prefix-cache-producer"]
    assert isinstance(precise, EndpointExtractor) and precise.extracts("endpoint-notification-source")
    assert precise.speculative_ttl == 2.0 and precise.kv_events_port == 5556 and precise.block_size == 64
    assert cfg.plugins["inflight-load-producer"].precise is precise
    assert cfg.plugins["prefix-cache-affinity-filter"].precise is precise
    assert cfg.plugins["token-load-scorer"].producer is cfg.plugins["inflight-load-producer"]
    params = cfg.plugin_parameters
    assert params["prefix-cache-affinity-filter"]["prefixMatchInfoProducerName"] == "precise-prefix-cache-producer"
    assert params["inflight-load-producer"]["prefixMatchInfoProducerName"] == "precise-prefix-cache-producer"
    said = " | ".join(cfg.warnings)  # what changes nothing here says so; nothing else does
    assert "concurrency has no effect" in said and len(cfg.warnings) == 1
    assert precise.index.metrics is not None  # enableMetrics: true counts llm-d's kvblock metrics
    assert cfg.data_layer.endpoint_listeners == ("precise-prefix-cache-producer",)


def test_the_guide_shape_routes_a_shared_prefix_to_the_endpoint_whose_kv_events_hold_it():
    cfg = load(PRECISE_ROUTING_GUIDE.replace("blockSizeTokens: 64", "blockSizeTokens: 4"))
    precise = cfg.plugins["precise-prefix-cache-producer"]
    tp = cfg.plugins["token-producer"]

    class Renderer:
        async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered:
            return Rendered(list(range(400)))  # the prompt as the server tokenizes it: 100 blocks of 4

    tp.renderer = Renderer()
    director = _director(cfg, addrs=(A, B, C))
    apply_events(precise.index, B, [BlockStored(list(range(100)), None, list(range(400)), 4)])  # B holds it all

    async def send() -> str:
        stream = RequestStream(director)
        stream.handle(headers_msg())
        stream.handle(body_msg(completion_body(prompt="whatever the text", stream=True), True))
        await director.prepare(stream.request)  # type: ignore[arg-type]
        return stream.resume()[0].request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()

    assert asyncio.run(send()) == B
    (b,) = [e for e in director.datastore.candidates() if e.address == B]
    assert b.in_flight == 1 and b.in_flight_prefill_tokens == 0  # every block is cached there: nothing to prefill


async def test_a_local_tokenizer_folder_tokenizes_in_a_worker_thread_before_the_pick(hf_dir):  # noqa: F811 - the fixture
    from pickers.indexes.tokenization import HFTokenizer

    cfg = load(f"plugins:\n- type: token-producer\n  parameters: {{local: {{tokenizer: {hf_dir}, timeout: 2s}}}}\n- type: max-score-picker\n")
    tp = cfg.plugins["token-producer"]
    req = completion("def test_something(): return 42")
    assert tp.needs_io(req)  # a real tokenizer: awaited off the event loop
    tp.produce(req, CycleState(), [])
    assert req.prompt_token_ids is None  # never inline
    await tp.prepare(req)
    assert req.prompt_token_ids == HFTokenizer(hf_dir).encode("def test_something(): return 42", add_special_tokens=True)
    tp.close()
