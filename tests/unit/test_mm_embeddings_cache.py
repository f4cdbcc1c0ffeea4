"""mm-embeddings-cache-producer and -scorer (llm-d): each unique image, video or audio item of a request
is named by a content hash (vLLM's own when a render call or a generate body gave them, else the part as
sent), matched against one LRU per endpoint of the items routed there, and scored matched / total;
after the pick the chosen endpoint (and each other profile's pick) holds them. Driven through the body
parsers, the config loader and the Scheduler as the EPP drives them."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from aiohttp import web

from extproc.cli import main as cli
from extproc.handlers.anthropic import parse_messages
from extproc.handlers.generate import parse_vllm_generate
from extproc.handlers.request_body import parse_body
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.render import VllmRenderClient
from extproc.server.runner import EppServer, ServeOptions
from pickers.config.loader import EndpointPickerConfig, load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, Endpoint, EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, EndpointState, SchedulingResult
from pickers.indexes.encoder_cache import EncoderCacheIndex, MediaItem, media_items
from pickers.plugins.base import PluginContext
from pickers.plugins.producer.tokens import Rendered, TokenProducer
from pickers.plugins.scorer.affinity.mm_embeddings import (
    MMEmbeddingsCacheProducer,
    MMEmbeddingsCacheScorer,
    entries_for,
)

CONFIGS = Path(__file__).parent / "configs"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
CAT = "https://example.com/cat.png"
DOG = "https://example.com/dog.png"
PIXELS = base64.b64encode(b"\x89PNG\r\n\x1a\n not really an image").decode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts: dict, text: str = "What is in this picture?") -> InferenceRequest:
    req = InferenceRequest("r", "/v1/chat/completions", {}, "chat")
    content = [{"type": "text", "text": text}, *parts]
    parse_body(req, json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode(), "messages")
    return req


def text_chat(text: str = "just words") -> InferenceRequest:
    req = InferenceRequest("r", "/v1/chat/completions", {}, "chat")
    parse_body(req, json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode(), "messages")
    return req


def anthropic_image(data: str, media_type: str = "image/png") -> InferenceRequest:
    req = InferenceRequest("r", "/v1/messages", {}, "messages")
    source = {"type": "base64", "media_type": media_type, "data": data}
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": source}]}]}
    parse_messages(req, json.dumps(body).encode(), "messages")
    return req


def keys(req: InferenceRequest) -> list[str]:
    return [item.key for item in media_items(req)]


def ep(address: str, role: str | None = None) -> Endpoint:
    host, port = address.split(":")
    return Endpoint(EndpointSpec(f"pod-{host}", host, int(port), {ROLE_LABEL: role} if role else {}))


def load(text: str) -> EndpointPickerConfig:
    return load_config(HEADER + text, "t.yaml", PluginContext(rng=random.Random(0)))


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(text)
    return str(e.value)


def scheduler_of(cfg: EndpointPickerConfig) -> Scheduler:
    return Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)


SIMPLE = """\
plugins:
- type: mm-embeddings-cache-producer
- type: mm-embeddings-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: mm-embeddings-cache-scorer
  - pluginRef: max-score-picker
"""


# -- what names an item ---------------------------------------------------------------------------
def test_the_same_image_in_two_requests_has_the_same_hash_and_a_different_one_another():
    assert keys(chat(image(CAT))) == keys(chat(image(CAT), text="another question entirely"))
    assert keys(chat(image(CAT))) != keys(chat(image(DOG)))
    inline = f"data:image/png;base64,{PIXELS}"
    assert keys(chat(image(inline))) == keys(chat(image(inline)))
    assert keys(chat(image(inline))) != keys(chat(image(f"data:image/png;base64,{PIXELS[:-4]}AAAA")))


def test_an_item_repeated_in_a_request_counts_once_in_prompt_order():
    items = media_items(chat(image(CAT), image(DOG), image(CAT)))
    assert [i.modality for i in items] == ["image", "image"] and items[0].key == keys(chat(image(CAT)))[0]


def test_video_and_audio_parts_are_items_named_by_their_url_or_data():
    video = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    wav = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    mp3 = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}}
    remote = {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}
    other = {"type": "audio_url", "audio_url": {"url": "https://example.com/b.wav"}}
    items = media_items(chat(video, wav, mp3, remote, other))
    assert [i.modality for i in items] == ["video", "audio", "audio", "audio", "audio"]
    assert len({i.key for i in items}) == 5  # the format is part of an input_audio item; each URL its own


def test_an_anthropic_base64_image_is_the_same_item_as_the_same_data_url():
    assert keys(anthropic_image(PIXELS)) == keys(chat(image(f"data:image/png;base64,{PIXELS}")))
    assert keys(anthropic_image(PIXELS)) != keys(anthropic_image(PIXELS, "image/gif"))


def test_a_text_only_request_has_no_items():
    assert media_items(text_chat()) == ()
    assert media_items(chat()) == ()


def test_the_servers_own_hashes_name_the_items_when_the_request_has_them():
    req = chat(image(CAT))
    req.media_hashes = {"image": ["vllm-cat", "vllm-cat"], "video": ["vllm-clip"]}
    assert media_items(req) == (MediaItem("vllm-cat", "image"), MediaItem("vllm-clip", "video"))
    req.media_hashes = {}  # the server found no media (a text-only model): nothing to match
    assert media_items(req) == ()


def test_a_vllm_generate_body_gives_its_features_mm_hashes():
    req = InferenceRequest("r", "/inference/v1/generate", {}, "generate")
    body = {"model": "m", "token_ids": [1, 2, 3], "features": {"mm_hashes": {"image": ["h1", None, "h2"]}, "mm_placeholders": {}}}
    parse_vllm_generate(req, json.dumps(body).encode(), "token_ids")
    assert req.media_hashes == {"image": ["h1", "h2"]}
    plain = InferenceRequest("r", "/inference/v1/generate", {}, "generate")
    parse_vllm_generate(plain, json.dumps({"model": "m", "token_ids": [1]}).encode(), "token_ids")
    assert plain.media_hashes is None and media_items(plain) == ()


# -- the index ------------------------------------------------------------------------------------
def test_each_endpoints_lru_holds_cache_size_over_2_mib_items_and_drops_the_oldest():
    assert entries_for(4096) == 2048 and entries_for(2048) == 1024 and entries_for(1) == 1
    index = EncoderCacheIndex(entries_for(6))  # 3 items
    index.record(A, ["i1", "i2", "i3"])
    index.record(A, ["i1"])  # routed again: the most recent now
    index.record(A, ["i4"])  # full: the oldest (i2) goes
    assert [k for k in ("i1", "i2", "i3", "i4") if index.holds(A, k)] == ["i1", "i3", "i4"]
    index.record(B, ["i2"])
    assert index.items_of(A) == 3 and index.items_of(B) == 1 and index.size() == 4


def test_a_lookup_does_not_refresh_an_items_place_in_the_lru():
    index = EncoderCacheIndex(2)
    index.record(A, ["old", "new"])
    index.match((MediaItem("old", "image"),))
    index.record(A, ["newest"])
    assert not index.holds(A, "old") and index.holds(A, "new")


def test_an_endpoint_that_leaves_takes_its_entries_and_hit_counts():
    index = EncoderCacheIndex(8)
    index.record(A, ["x"])
    index.record(B, ["x"])
    assert index.match((MediaItem("x", "image"),)).matched == {A: 1, B: 1}
    index.remove_endpoint(A)
    assert index.match((MediaItem("x", "image"),)).matched == {B: 1}
    assert set(index.stats.hits) == {(B, "image")} and index.size() == 1


# -- the score ------------------------------------------------------------------------------------
def test_the_score_is_the_share_of_the_requests_items_an_endpoint_holds():
    cfg = load(SIMPLE)
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    scorer: MMEmbeddingsCacheScorer = cfg.plugins["mm-embeddings-cache-scorer"]  # type: ignore[assignment]
    req = chat(image(CAT), image(DOG), image("https://example.com/bird.png"))
    cat, dog, bird = keys(req)
    producer.index.record(A, [cat, dog])
    producer.index.record(B, [bird])
    endpoints = [ep(A), ep(B), ep(C)]
    assert scorer.score(req, CycleState(), endpoints) == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_a_text_only_request_scores_0_everywhere_and_records_nothing():
    cfg = load(SIMPLE)
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    producer.index.record(A, ["something"])
    sched = scheduler_of(cfg)
    endpoints = [ep(A), ep(B)]
    cycle = CycleState()
    assert cfg.plugins["mm-embeddings-cache-scorer"].score(text_chat(), cycle, endpoints) == [0.0, 0.0]  # type: ignore[attr-defined]
    sched.schedule(text_chat(), endpoints)
    assert producer.index.size() == 1 and not producer.index.stats.queries


# -- after the pick -------------------------------------------------------------------------------
def test_after_the_pick_the_chosen_endpoint_holds_the_items_and_the_next_request_with_them_follows():
    cfg = load(SIMPLE)
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    sched = scheduler_of(cfg)
    endpoints = [ep(A), ep(B), ep(C)]
    first = sched.schedule(chat(image(CAT)), endpoints).endpoints[0].address
    (cat,) = keys(chat(image(CAT)))
    assert [a for a in (A, B, C) if producer.index.holds(a, cat)] == [first]
    for _ in range(5):  # the same image, another question: the same endpoint every time
        assert sched.schedule(chat(image(CAT), text="and now?"), endpoints).endpoints[0].address == first
    assert producer.index.size() == 1


def test_only_the_primary_is_recorded_not_the_fallbacks():
    cfg = load(SIMPLE.replace("- type: max-score-picker\n", "- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 3}\n"))
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    result = scheduler_of(cfg).schedule(chat(image(CAT)), [ep(A), ep(B), ep(C)])
    assert len(result.endpoints) == 3
    assert [e.address for e in result.endpoints if producer.index.items_of(e.address)] == [result.endpoints[0].address]


def test_recording_happens_once_per_request_whoever_asks():
    producer = MMEmbeddingsCacheProducer()
    req, cycle = chat(image(CAT)), CycleState()
    result = SchedulingResult([ep(A)])
    producer.pre_request(req, cycle, result)
    producer.index.remove_endpoint(A)
    producer.pre_request(req, cycle, result)  # a scorer delegating to the same producer: nothing more
    assert producer.index.size() == 0


EPD = CONFIGS / "guides" / "e-p-d-mm-embeddings.yaml"


def test_with_e_p_d_the_encoder_that_computed_the_embeddings_holds_them_and_gets_the_repeat():
    cfg = load_config_file(EPD, PluginContext(rng=random.Random(1)))
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    sched = scheduler_of(cfg)
    encoders = [ep(f"10.0.3.{i}:8000", "encode") for i in range(3)]
    pool = [*encoders, ep("10.0.0.1:8000", "prefill"), ep("10.0.1.1:8000", "decode")]
    result = sched.schedule(chat(image(CAT)), pool)
    assert result.encoders is not None
    (encoder,) = result.encoders
    (cat,) = keys(chat(image(CAT)))
    assert [e.address for e in pool if producer.index.holds(e.address, cat)] == [encoder.address, "10.0.0.1:8000", "10.0.1.1:8000"]
    for _ in range(4):
        again = sched.schedule(chat(image(CAT), text="something else about it"), pool)
        assert again.encoders == [encoder] and again.request_headers["x-encoder-hosts-ports"] == encoder.address


# -- binding and parameters -----------------------------------------------------------------------
def test_the_scorer_reads_the_named_producer_or_the_configs_only_one_or_llm_ds_default():
    two = """\
plugins:
- {type: mm-embeddings-cache-producer, name: small, parameters: {cacheSizeInMBPerServer: 64}}
- {type: mm-embeddings-cache-producer, name: big}
- {type: mm-embeddings-cache-scorer, parameters: {producerName: small}}
"""
    cfg = load(two)
    assert cfg.plugins["mm-embeddings-cache-scorer"].producer is cfg.plugins["small"]  # type: ignore[attr-defined]
    assert cfg.plugin_parameters["mm-embeddings-cache-scorer"]["producerName"] == "small"
    assert "2 mm-embeddings-cache-producer plugins (small, big); name the one" in refused(two.replace("{producerName: small}", "{}"))
    assert "producerName: mm-embeddings-cache-scorer: 'queue-scorer': queue-scorer, not a mm-embeddings-cache-producer" in refused(
        "plugins:\n- type: queue-scorer\n- {type: mm-embeddings-cache-scorer, parameters: {producerName: queue-scorer}}\n"
    )
    alone = load("plugins:\n- type: mm-embeddings-cache-scorer\n")  # llm-d creates a default producer
    implied = alone.plugins["mm-embeddings-cache-scorer"].producer  # type: ignore[attr-defined]
    assert isinstance(implied, MMEmbeddingsCacheProducer) and implied.index.capacity == 2048
    sched = scheduler_of(alone)
    first = sched.schedule(chat(image(CAT)), [ep(A), ep(B), ep(C)]).endpoints[0].address
    assert sched.schedule(chat(image(CAT)), [ep(A), ep(B), ep(C)]).endpoints[0].address == first


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ("{cacheSizeInMB: 2048}", "cacheSizeInMB", "cacheSizeInMBPerServer"),
        ("{cacheSize: 10000}", "cacheSize", "older llm-d's entry count"),
        ("{cacheSizeInEmbeddingsPerServer: 8192}", "cacheSizeInEmbeddingsPerServer", "later llm-d's"),
        ("{cacheSizeInMBPerServer: lots}", "cacheSizeInMBPerServer", "expected an integer"),
        ("{weighted: true}", "weighted", "unknown parameter"),
    ],
)
def test_producer_parameters_it_does_not_act_on_are_refused_by_name(params, field, fragment):
    msg = refused(f"plugins:\n- type: mm-embeddings-cache-producer\n  parameters: {params}\n")
    assert f"plugins[0].parameters.{field}" in msg and fragment in msg


def test_a_cache_size_of_0_or_less_is_llm_ds_default_with_a_warning():
    cfg = load("plugins:\n- type: mm-embeddings-cache-producer\n  parameters: {cacheSizeInMBPerServer: 0}\n")
    assert cfg.plugins["mm-embeddings-cache-producer"].index.capacity == 2048  # type: ignore[attr-defined]
    assert any("cacheSizeInMBPerServer 0 is not positive; using 4096" in w for w in cfg.warnings)


# -- configs in the reference's and the guides' shapes --------------------------------------------
def test_the_reference_sample_config_shape_loads_with_both_producers_following_the_endpoints():
    cfg = load_config_file(CONFIGS / "mm-embeddings-cache.yaml", PluginContext())
    assert cfg.data_layer.endpoint_listeners == ("mm-embeddings-cache-producer", "precise-prefix-cache-producer")
    producer = cfg.plugins["mm-embeddings-cache-producer"]
    assert cfg.plugins["mm-embeddings-cache-scorer"].producer is producer  # type: ignore[attr-defined]
    assert producer.index.capacity == 1024  # type: ignore[attr-defined]
    assert [w for w in cfg.warnings if "blockSize is deprecated" not in w] == []
    text = (CONFIGS / "mm-embeddings-cache.yaml").read_text().replace("cacheSizeInMBPerServer: 2048", "cacheSizeInMB: 2048")
    with pytest.raises(ConfigError, match=r"plugins\[4\]\.parameters\.cacheSizeInMB: .*cacheSizeInMBPerServer"):
        load_config(text, "sample.yaml")


@pytest.mark.parametrize("name", ["multimodal-precise-affinity", "multimodal-precise-affinity-cold-lru", "guides/e-p-d-mm-embeddings"])
def test_the_guide_shapes_check_clean(name, capsys):
    path = CONFIGS / f"{name}.yaml"
    rc = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "warning" not in out.out.lower() and out.err == ""
    assert "mm-embeddings-cache-scorer: producerName=mm-embeddings-cache-producer" in out.out


# -- the render call's hashes ---------------------------------------------------------------------
async def _render_server(answer: dict) -> tuple[web.AppRunner, str]:
    async def chat_render(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/chat/completions/render", chat_render)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"mm_hashes": {"image": ["abc", "def"]}, "mm_placeholders": {"image": []}, "kwargs_data": ["x" * 1000]}, {"image": ["abc", "def"]}),
        (None, {}),  # a text-only prompt: vLLM found no media
        ({"mm_hashes": "garbled"}, None),  # the tokens still count; the items are hashed as sent
    ],
    ids=["hashes", "none", "garbled"],
)
async def test_the_render_answer_names_the_items_as_vllm_hashes_them(features, expected):
    runner, url = await _render_server({"token_ids": [5, 6, 7], "features": features})
    client = VllmRenderClient(url)
    try:
        rendered = await client.render(chat(image(CAT)), "m", 5.0)
    finally:
        await client.close()
        await runner.cleanup()
    assert rendered == Rendered([5, 6, 7], expected)


async def test_the_token_producer_puts_the_render_hashes_on_the_request():
    tp = TokenProducer(backend="vllm", model_name="m")

    class Renderer:
        async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered:
            return Rendered([1, 2], {"image": ["vllm-cat"]})

    tp.renderer = Renderer()
    req = chat(image(CAT))
    await tp.prepare(req)
    assert req.prompt_token_ids == [1, 2] and media_items(req) == (MediaItem("vllm-cat", "image"),)


# -- the EPP around it ----------------------------------------------------------------------------
def test_llm_ds_encoder_cache_metrics_count_lookups_hits_and_hit_ratios():
    cfg = load(SIMPLE)
    producer: MMEmbeddingsCacheProducer = cfg.plugins["mm-embeddings-cache-producer"]  # type: ignore[assignment]
    sched = scheduler_of(cfg)
    endpoints = [ep(A), ep(B)]
    chosen = sched.schedule(chat(image(CAT)), endpoints).endpoints[0]
    sched.schedule(chat(image(CAT), image(DOG)), endpoints)
    m = EppMetrics(pool_name="p", version="t")
    m.attach_precise(sched.plugins)
    text = m.exposition().decode()
    labels = 'plugin_name="mm-embeddings-cache-producer",plugin_type="mm-embeddings-cache-producer"'
    assert f'llm_d_epp_encoder_cache_queries_total{{modality="image",{labels}}} 3.0' in text
    assert f'llm_d_epp_encoder_cache_hits_total{{modality="image",{labels},pod="{chosen.address}"}} 1.0' in text
    # per lookup and endpoint: the first request 0 on both, the second 1/2 on the chosen and 0 on the other
    assert f'llm_d_epp_encoder_cache_hit_ratio_count{{{labels}}} 4.0' in text
    assert f'llm_d_epp_encoder_cache_hit_ratio_bucket{{le="0.0",{labels}}} 3.0' in text
    assert producer.index.stats.hit_ratio.sum == pytest.approx(0.5)


def test_the_epp_drops_an_endpoints_entries_when_it_leaves_the_pool():
    server = EppServer(ServeOptions(config_text=HEADER + SIMPLE))
    (producer,) = [p for p in server.scheduler.plugins if isinstance(p, MMEmbeddingsCacheProducer)]
    assert isinstance(producer, EndpointState)
    server.datastore.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    producer.index.record(A, ["x"])
    producer.index.record(B, ["x"])
    server.datastore.set_endpoints([EndpointSpec("b", "10.0.0.2", 8000)])
    assert producer.index.items_of(A) == 0 and producer.index.items_of(B) == 1
