"""token-producer's estimate of a prompt's media (llm-d's `estimate.image`, `estimate.video`): each
image, video or audio part counts its placeholder tokens instead of its text; an image's size comes
from the header of its inline base64 data, else the default resolution."""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib

import pytest

from extproc.handlers.anthropic import parse_messages
from extproc.handlers.request_body import parse_body
from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest, MediaPart
from pickers.framework.types import CycleState
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.producer.media import (
    HEADER_BYTES,
    ImageEstimate,
    MediaEstimate,
    VideoEstimate,
    image_size,
)
from pickers.plugins.producer.tokens import TokenProducer

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
REMOTE = "https://example.com/cat.png"


# -- tiny images, built by hand -------------------------------------------------------------------
def png(w: int, h: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    idat = b"IDAT" + zlib.compress(b"\x00" * (w * 3 + 1) * h)
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b";"


def jpeg(w: int, h: int, app_bytes: int = 14, marker: int = 0xC0, apps: int = 1) -> bytes:
    app0 = (b"\xff\xe0" + struct.pack(">H", app_bytes + 2) + b"JFIF\x00".ljust(app_bytes, b"\x00")) * apps
    sof = bytes([0xFF, marker]) + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof + b"\xff\xda"


def webp(w: int, h: int) -> bytes:  # a VP8X header: llm-d decodes no WebP, so neither do we
    body = b"WEBPVP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


# -- images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "mime"), [(png(300, 200), "image/png"), (gif(300, 200), "image/gif"),
                                           (jpeg(300, 200), "image/jpeg"), (jpeg(300, 200, marker=0xC2), "image/jpeg"),
                                           (jpeg(300, 200, app_bytes=40_000), "image/jpeg")])  # fmt: skip
def test_each_header_format_gives_the_images_size(raw: bytes, mime: str):
    assert image_size(data_url(raw, mime), inline=False) == (300, 200)
    assert image_size(base64.b64encode(raw).decode(), inline=True) == (300, 200)  # an Anthropic base64 source


def test_the_format_is_read_from_the_bytes_not_the_mime_type():
    assert image_size(data_url(png(64, 32), "image/jpeg"), inline=False) == (64, 32)


def test_dynamic_mode_is_width_times_height_over_the_factor():
    assert ImageEstimate().tokens(data_url(png(1024, 512)), False) == 512
    assert ImageEstimate(factor=784).tokens(data_url(gif(1280, 720), "image/gif"), False) == 1280 * 720 // 784
    assert ImageEstimate().tokens(data_url(png(10, 10)), False) == 1  # every image weighs a token at least


def test_a_remote_url_has_the_default_resolution_and_is_never_fetched():
    assert ImageEstimate().tokens(REMOTE, False) == 640 * 360 // 1024 == 225
    assert ImageEstimate(factor=784, width=1280, height=720).tokens(REMOTE, False) == 1175


@pytest.mark.parametrize("url", [
    data_url(webp(300, 200), "image/webp"),  # not a format llm-d decodes
    "data:image/png;base64,!!!!not base64!!!!",
    "data:image/png,rawbytes",  # not base64
    "data:image/png;base64,",
    data_url(png(300, 200)[:20]),  # cut inside the IHDR
    data_url(png(300, 200)[:29] + b"\x00\x00\x00\x00"),  # IHDR with a wrong CRC
    data_url(jpeg(300, 200, marker=0xC3), "image/jpeg"),  # lossless JPEG: Go decodes none
    data_url(jpeg(300, 200, app_bytes=HEADER_BYTES // 2, apps=3), "image/jpeg"),  # the frame header past the bytes read
    "data:image/png;base64," + "A" * 20_000_000,  # 15 MB of zeros: only the header bytes are decoded
])
def test_an_image_whose_size_cannot_be_read_has_the_default_resolution(url: str):
    assert image_size(url, inline=False) is None
    assert ImageEstimate().tokens(url, False) == 225


def test_static_mode_counts_a_constant_per_image():
    assert ImageEstimate(static_tokens=256).tokens(data_url(png(4000, 4000)), False) == 256
    assert ImageEstimate(static_tokens=256).tokens(REMOTE, False) == 256


# -- videos ---------------------------------------------------------------------------------------
def test_video_defaults_sample_2_fps_of_10_seconds_at_640x360():
    assert VideoEstimate().tokens({}) == 20 * 225


def test_video_headers_override_duration_and_resolution():
    headers = {"x-llm-d-video-duration-seconds": "4", "x-llm-d-video-resolution": "320x240"}
    assert VideoEstimate().tokens(headers) == 8 * (320 * 240 // 1024)
    assert VideoEstimate(temporal_patch_size=2, max_frames=6).tokens(headers) == 3 * 75  # qwen3: clamp, then merge pairs


def test_malformed_video_headers_fall_back_to_the_config():
    headers = {"x-llm-d-video-duration-seconds": "-3", "x-llm-d-video-resolution": "wide", "x-llm-d-video-fps": "nan"}
    assert VideoEstimate(duration=5).tokens(headers) == 10 * 225


def test_strided_frames_with_static_tokens_per_frame_and_the_cap():
    gemma = VideoEstimate(static_tokens_per_frame=70, strided=True, frame_stride=2)
    assert gemma.tokens({}) == (10 * 24 // 2) * 70
    assert gemma.tokens({"x-llm-d-video-fps": "30", "x-llm-d-video-duration-seconds": "2"}) == 30 * 70
    assert VideoEstimate(static_tokens_per_frame=70, strided=True, min_frames=40, max_tokens=2000).tokens({}) == 2000


def test_audio_counts_a_token_per_4_characters_of_its_data():
    assert MediaEstimate().tokens([MediaPart("audio", size=10), MediaPart("audio")], {}) == 3 + 1


# -- through the parsers and the producer ---------------------------------------------------------
def producer(estimate: str = "{}") -> TokenProducer:
    cfg = load_config(HEADER + f"plugins:\n- type: token-producer\n  parameters: {{estimate: {estimate}}}\n"
                      "- type: max-score-picker\n", "t.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))  # fmt: skip
    tp = cfg.plugins["token-producer"]
    assert isinstance(tp, TokenProducer)
    return tp


def chat(content: object, headers: dict[str, str] | None = None) -> InferenceRequest:
    req = InferenceRequest("r", "/v1/chat/completions", headers or {}, "chat")
    parse_body(req, json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode(), "messages")
    return req


GUIDE = "{image: {mode: dynamic, defaultResolution: {width: 1280, height: 720}, dynamic: {factor: 784}}}"


def test_a_chat_prompt_counts_its_text_and_each_images_placeholders():
    text = chat([{"type": "text", "text": "describe these " * 8}])
    req = chat([{"type": "text", "text": "describe these " * 8}, {"type": "image_url", "image_url": {"url": REMOTE}},
                {"type": "image_url", "image_url": {"url": data_url(png(784, 100))}}])  # fmt: skip
    assert req.media is not None and [m.kind for m in req.media] == ["image", "image"]
    producer(GUIDE).produce(req, CycleState(), [])
    assert req.prompt_token_ids is None and req.prompt_tokens == text.prompt_tokens + 1175 + 100


def test_a_video_part_counts_with_the_requests_video_headers():
    text = chat([{"type": "text", "text": "what happens"}])
    req = chat([{"type": "text", "text": "what happens"}, {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}],
               {"x-llm-d-video-duration-seconds": "3"})  # fmt: skip
    producer().produce(req, CycleState(), [])
    assert req.prompt_tokens == text.prompt_tokens + 6 * 225


def test_text_only_prompts_count_as_before():
    req = chat("plain words, no pictures " * 20)
    before = req.prompt_tokens
    producer(GUIDE).produce(req, CycleState(), [])
    assert req.media is None and req.media_tokens is None and req.prompt_tokens == before == len(req.prompt_text) // 4


def test_without_a_token_producer_media_parts_count_as_their_text():
    req = chat([{"type": "image_url", "image_url": {"url": REMOTE}}])
    assert req.multimodal and req.prompt_tokens == len(req.prompt_text) // 4


def test_an_anthropic_base64_image_is_sized_from_its_data():
    req = InferenceRequest("r", "/v1/messages", {}, "messages")
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(1568, 100)).decode()}
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": source}, {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "url", "url": REMOTE}}]}]}]}  # fmt: skip
    parse_messages(req, json.dumps(body).encode(), "messages")
    assert req.media is not None and [m.inline for m in req.media] == [True, False]
    producer(GUIDE).produce(req, CycleState(), [])
    assert req.media_tokens == 1568 * 100 // 784 + 1175


def test_the_vllm_backend_leaves_media_to_the_render_server():
    cfg = load_config(HEADER + "plugins:\n- type: token-producer\n  parameters: {modelName: m}\n- type: max-score-picker\n",
                      "t.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))  # fmt: skip
    req = chat([{"type": "image_url", "image_url": {"url": REMOTE}}])
    cfg.plugins["token-producer"].produce(req, CycleState(), [])
    assert req.media_tokens is None


# -- the config -----------------------------------------------------------------------------------
def refused(estimate: str) -> str:
    with pytest.raises(ConfigError) as e:
        producer(estimate)
    return str(e.value)


@pytest.mark.parametrize(("estimate", "field", "fragment"), [
    ("{image: {mode: fixed}}", "estimate.image.mode", "expected one of dynamic, static"),
    ("{image: {dynamic: {factor: -4}}}", "estimate.image.dynamic.factor", "expected an integer >= 1"),
    ("{image: {dynamic: {factr: 4}}}", "estimate.image.dynamic.factr", "unknown parameter"),
    ("{image: {defaultResolution: {width: 0}}}", "estimate.image.defaultResolution.width", ">= 1"),
    ("{image: {mode: static, dynamic: {factor: 4}}}", "estimate.image.dynamic", "read only in dynamic mode"),
    ("{image: {static: {staticToken: -1}}}", "estimate.image.static", "read only in static mode"),
    ("{video: {tokensPerFrame: {mode: sometimes}}}", "estimate.video.tokensPerFrame.mode", "expected one of dynamic, static"),
    ("{video: {frames: {mode: all}}}", "estimate.video.frames.mode", "expected one of sampled, strided"),
    ("{video: {frames: {mode: strided, strided: {frameStride: 0}}}}", "estimate.video.frames.strided.frameStride", ">= 1"),
    ("{video: {frames: {sampled: {sampleFPS: -1}}}}", "estimate.video.frames.sampled.sampleFPS", "positive"),
    ("{video: {frames: {minFrames: 9, maxFrames: 4}}}", "estimate.video.frames.minFrames", "must not exceed maxFrames"),
    ("{video: {maxVideoTokens: -1}}", "estimate.video.maxVideoTokens", ">= 0"),
    ("{video: {fps: 3}}", "estimate.video.fps", "unknown parameter"),
    ("{audio: {}}", "estimate.audio", "unknown parameter"),
])  # fmt: skip
def test_bad_media_settings_are_refused_naming_the_field(estimate: str, field: str, fragment: str):
    msg = refused(estimate)
    assert f"plugins[0].parameters.{field}" in msg and fragment in msg


def test_static_mode_without_a_count_loads_with_llm_ds_one_token_and_a_warning():
    cfg = load_config(HEADER + "plugins:\n- type: token-producer\n  parameters: {estimate: {image: {mode: static}}}\n"
                      "- type: max-score-picker\n", "t.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))  # fmt: skip
    assert any("estimate.image.static.staticToken is not set" in w for w in cfg.warnings)
    assert cfg.plugins["token-producer"].media.image.tokens(REMOTE, False) == 1
