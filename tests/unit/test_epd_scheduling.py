"""E/P/D scheduling: disagg-profile-handler runs decode, then (when always-disagg-multimodal-decider sees
an image, audio or video part) encode on encode-filter's endpoints, then prefill if its decider says so.
The encode picks go in x-encoder-hosts-ports, comma-separated. Driven through the config loader, the
body parsers and the Scheduler as the EPP does, on a datastore of labelled endpoints."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.anthropic import parse_messages
from extproc.handlers.request_body import parse_body
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.filter.role import DecodeFilter, EncodeFilter, PrefillFilter
from tests.unit.test_protocol import send_request, set_headers

GUIDES = Path(__file__).parent / "configs" / "guides"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
LONG = "The quick brown fox jumps over the lazy dog. " * 100  # ~1,125 tokens: prefilled remotely
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
ENCODERS = {"10.0.3.0:8000", "10.0.3.1:8000"}


def pool(encode: int = 2, prefill: int = 1, decode: int = 2) -> Datastore:
    ds = Datastore()
    specs = [EndpointSpec(f"e{i}", f"10.0.3.{i}", 8000, {ROLE_LABEL: "encode"}) for i in range(encode)]
    specs += [EndpointSpec(f"p{i}", f"10.0.0.{i}", 8000, {ROLE_LABEL: "prefill"}) for i in range(prefill)]
    specs += [EndpointSpec(f"d{i}", f"10.0.1.{i}", 8000, {ROLE_LABEL: "decode"}) for i in range(decode)]
    ds.set_endpoints(specs)
    return ds


def scheduler(config: str | Path) -> Scheduler:
    ctx = PluginContext(rng=random.Random(3))
    cfg = load_config_file(config, ctx) if isinstance(config, Path) else load_config(HEADER + config, "test", ctx)
    return Scheduler(cfg.profiles, handler=cfg.profile_handler)


def chat(*content_parts: dict, text: str = LONG) -> InferenceRequest:
    req = InferenceRequest("r", "/v1/chat/completions", {}, "chat")
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *content_parts]}]}
    parse_body(req, json.dumps(body).encode(), "messages")
    return req


# -- the body parsers flag multimodal parts --------------------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        IMAGE,
        {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
    ],
    ids=lambda p: p["type"],
)
def test_a_chat_image_audio_or_video_part_marks_the_request_multimodal(part):
    assert chat(part).multimodal


def test_text_only_chat_requests_are_not_multimodal():
    assert not chat().multimodal
    assert not chat({"type": "text", "text": "more"}).multimodal
    req = InferenceRequest("r", "/v1/chat/completions", {}, "chat")
    parse_body(req, json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(), "messages")
    assert not req.multimodal


def test_other_apis_and_unknown_part_types_are_not_multimodal():
    req = InferenceRequest("r", "/v1/completions", {}, "completions")
    parse_body(req, json.dumps({"model": "m", "prompt": "an image_url of a cat"}).encode(), "prompt")
    assert not req.multimodal
    assert not chat({"type": "refusal", "refusal": "no"}).multimodal


def test_an_anthropic_image_block_marks_the_request_multimodal_and_text_does_not():
    def messages(*blocks: dict) -> InferenceRequest:
        req = InferenceRequest("r", "/v1/messages", {}, "messages")
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, *blocks]}]}
        parse_messages(req, json.dumps(body).encode(), "messages")
        return req

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}}
    assert messages(image).multimodal
    assert messages({"type": "tool_result", "tool_use_id": "t", "content": [image]}).multimodal
    assert not messages().multimodal
    assert not messages({"type": "tool_result", "tool_use_id": "t", "content": "plain"}).multimodal


# -- role filters -------------------------------------------------------------------------------


def test_role_filters_keep_llm_ds_roles():
    roles = ["encode", "encode-prefill", "encode-prefill-decode", "prefill", "prefill-decode", "both", "decode", None]
    ds = Datastore()
    ds.set_endpoints([EndpointSpec(str(r), f"10.0.0.{i}", 8000, {ROLE_LABEL: r} if r else {}) for i, r in enumerate(roles)])

    def kept(f) -> list[str]:
        return [e.spec.name for e in f.filter(InferenceRequest("r", "/", {}), CycleState(), ds.candidates())]

    assert kept(EncodeFilter()) == ["encode", "encode-prefill", "encode-prefill-decode"]
    assert kept(PrefillFilter()) == ["encode-prefill", "encode-prefill-decode", "prefill", "prefill-decode", "both"]
    assert kept(DecodeFilter()) == ["encode-prefill-decode", "prefill-decode", "both", "decode", "None"]


# -- the handler --------------------------------------------------------------------------------


def test_e_p_d_image_request_gets_a_decode_destination_an_encoder_and_a_prefiller():
    ds = pool()
    result = scheduler(GUIDES / "e-p-d.yaml").schedule(chat(IMAGE), ds.candidates())
    assert result.profile == "decode" and result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert result.request_headers["x-encoder-hosts-ports"] in ENCODERS  # the picker's default: one endpoint
    assert result.request_headers["x-prefiller-host-port"] == "10.0.0.0:8000"
    # encoders hold none of the prompt's KV: not recorded or charged as a profile pick
    assert result.profile_results is not None and set(result.profile_results) == {"decode", "prefill"}


def test_e_p_d_text_request_skips_the_encoder():
    ds = pool()
    result = scheduler(GUIDES / "e-p-d.yaml").schedule(chat(), ds.candidates())
    assert "x-encoder-hosts-ports" not in result.request_headers
    assert "x-prefiller-host-port" in result.request_headers


def test_e_pd_image_request_is_encoded_remotely_and_prefilled_on_the_decode_endpoint():
    ds = pool()
    result = scheduler(GUIDES / "e-pd.yaml").schedule(chat(IMAGE, text="what is this?"), ds.candidates())
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert result.request_headers["x-encoder-hosts-ports"] in ENCODERS
    assert "x-prefiller-host-port" not in result.request_headers


def test_stages_run_decode_then_encode_then_prefill():
    s = scheduler(GUIDES / "e-p-d.yaml")
    handler, profiles = s.handler, s.profiles
    ds = pool()
    decode = ds.candidates()[-1]
    req, cycle, results = chat(IMAGE), CycleState(), {}
    order = []
    for _ in range(4):
        todo = handler.pick(req, cycle, profiles, results)
        if not todo:
            break
        order += [p.name for p in todo]
        for p in todo:
            results[p.name] = [decode] if p.name == "decode" else [ds.candidates()[0]]
    assert order == ["decode", "encode", "prefill"]


def test_the_encode_profiles_picker_sets_how_many_encoders_are_listed():
    config = (GUIDES / "e-pd.yaml").read_text().replace("- type: max-score-picker\n", "- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}\n")
    ds = pool()
    result = scheduler(config.replace(HEADER, "")).schedule(chat(IMAGE), ds.candidates())
    assert set(result.request_headers["x-encoder-hosts-ports"].split(",")) == ENCODERS


def test_no_encode_endpoint_serves_the_image_request_without_the_header():
    ds = pool(encode=0)
    result = scheduler(GUIDES / "e-p-d.yaml").schedule(chat(IMAGE), ds.candidates())
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert "x-encoder-hosts-ports" not in result.request_headers


def test_the_encoder_header_reaches_the_upstream_request_through_the_request_stream():
    ds = pool(encode=1)
    s = scheduler(GUIDES / "e-pd.yaml")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}]}).encode()
    out = send_request(RequestStream(Director(ds, s, EppMetrics())), body, path="/v1/chat/completions")
    headers = next(h for h in (set_headers(r, r.WhichOneof("response")) for r in out if r.WhichOneof("response") in ("request_headers", "request_body")) if h)
    assert headers["x-encoder-hosts-ports"] == "10.0.3.0:8000"


# -- config refusals ------------------------------------------------------------------------------

TWO = "- type: encode-filter\n- type: decode-filter\n"
PROFILES = (
    "schedulingProfiles:\n- name: encode\n  plugins:\n  - pluginRef: encode-filter\n"
    "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n"
)


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + body, "epd.yaml")
    return str(e.value)


def test_an_unknown_encode_decider_names_the_parameter():
    msg = error_of("plugins:\n" + TWO + "- type: disagg-profile-handler\n  parameters:\n    deciders: {encode: nope}\n" + PROFILES)
    assert "plugins[2].parameters.deciders.encode" in msg and "no plugin named 'nope'" in msg


def test_an_encode_decider_that_is_not_a_decider_is_refused():
    msg = error_of("plugins:\n" + TWO + "- type: disagg-profile-handler\n  parameters:\n    deciders: {encode: encode-filter}\n" + PROFILES)
    assert "deciders.encode" in msg and "is not a disaggregation decider such as always-disagg-multimodal-decider" in msg


def test_an_encode_decider_without_the_encode_profile_is_refused():
    msg = error_of(
        "plugins:\n" + TWO + "- type: always-disagg-multimodal-decider\n- type: disagg-profile-handler\n"
        "  parameters:\n    profiles: {encode: enc}\n    deciders: {encode: always-disagg-multimodal-decider}\n" + PROFILES
    )
    assert "plugins[3].parameters.profiles.encode" in msg and "no scheduling profile named 'enc'" in msg


def test_the_deprecated_headers_handler_accepts_the_handlers_encode_profile():
    cfg = load_config(
        HEADER + "plugins:\n" + TWO + "- type: always-disagg-multimodal-decider\n- type: disagg-headers-handler\n"
        "  parameters: {encodeProfile: encode}\n- type: disagg-profile-handler\n"
        "  parameters:\n    deciders: {encode: always-disagg-multimodal-decider}\n" + PROFILES,
        "epd.yaml",
    )
    assert cfg.profile_handler is not None


def test_a_client_sent_encoder_header_is_removed_unless_the_epp_set_it():
    ds = pool(encode=1)
    s = scheduler(GUIDES / "e-pd.yaml")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "text only"}]}).encode()
    out = send_request(RequestStream(Director(ds, s, EppMetrics())), body, path="/v1/chat/completions",
                       extra={"x-encoder-hosts-ports": "169.254.169.254:80"})
    mutations = [getattr(r, r.WhichOneof("response")).response.header_mutation for r in out
                 if r.WhichOneof("response") in ("request_headers", "request_body")]
    assert any("x-encoder-hosts-ports" in m.remove_headers for m in mutations)
    assert all(h.header.key != "x-encoder-hosts-ports" for m in mutations for h in m.set_headers)
