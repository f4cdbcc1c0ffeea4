"""Objectives (priority by header), sheddable requests refused while the pool is saturated, and the
model rewrite of request bodies and replies, driven through RequestStream with no gRPC or network."""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.datalayer.datastore import Datastore
from extproc.handlers.model_name import ModelNameRestorer
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from extproc.requestcontrol.objectives import ObjectiveStore, load_objectives_file
from extproc.requestcontrol.rewrites import RewriteStore, Rule, Target, load_rewrites_file
from extproc.requestcontrol.saturation import SaturationConfig, SaturationDetector
from pickers.config.strategies import build_profile
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from tests.unit.test_protocol import (
    ADDRS,
    BUFFERED,
    FULL_DUPLEX,
    body_msg,
    completion_body,
    headers_msg,
    response_body_msg,
    response_headers_msg,
    send_request,
    set_headers,
)

OBJECTIVES = {"batch": -1, "interactive": 10}
ALIAS_RULES = [Rule(("alias",), (Target("sim-model"),))]


def make(*, rules=(), objectives=OBJECTIVES, waiting=0, kv=0.0, fresh=True):
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in ADDRS)
    for ep in ds.candidates():
        ds.update_metrics(ep.address, Metrics(waiting=waiting, kv_usage=kv, updated_at=time.monotonic() if fresh else 0.0))
    profile = build_profile("default", ApproxPrefixIndex(), rng=random.Random(0))
    metrics = EppMetrics()
    director = Director(
        ds, Scheduler(profile), metrics,
        objectives=ObjectiveStore(objectives), rewrites=RewriteStore(rules, rng=random.Random(0)),
        saturation=SaturationDetector(ds),
    )  # fmt: skip
    return director


def immediate(out):
    (resp,) = [r for r in out if r.HasField("immediate_response")] or [None]
    return resp.immediate_response if resp is not None else None


def streamed_body(out) -> bytes:
    return b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out if r.HasField("request_body"))


def dropped_reason(imm) -> str:
    return {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}.get("x-llm-d-request-dropped-reason", "")


# -- objectives and priority -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "priority"),
    [
        ({"x-gateway-inference-objective": "batch"}, -1),
        ({"x-llm-d-inference-objective": "interactive"}, 10),
        ({"x-gateway-inference-objective": "nobody-knows"}, 0),
        ({}, 0),
    ],
    ids=["gateway-header", "llm-d-alias", "unknown", "none"],
)
def test_the_objective_header_sets_the_request_priority(headers, priority):
    director = make()
    stream = RequestStream(director)
    send_request(stream, completion_body(), extra=headers)
    assert stream.request.priority == priority
    assert stream.request.objective == headers.get("x-gateway-inference-objective", headers.get("x-llm-d-inference-objective", ""))


def test_watched_objectives_win_over_the_file_and_deleting_falls_back():
    store = ObjectiveStore({"batch": -1})
    store.replace_watched({"batch": 5, "other": 2})
    assert (store.priority("batch"), store.priority("other")) == (5, 2)
    store.delete_watched("batch")
    assert store.priority("batch") == -1
    store.put_watched("other", -3)
    assert store.priority("other") == -3


def test_objectives_file_is_a_list_of_name_and_priority(tmp_path):
    f = tmp_path / "objectives.yaml"
    f.write_text("- {name: batch, priority: -1}\n- name: default\n")
    assert load_objectives_file(f) == {"batch": -1, "default": 0}


@pytest.mark.parametrize(
    ("text", "field"),
    [("- {name: a, priority: high}\n", "[0].priority"), ("- {priority: 1}\n", "[0].name"), ("- {name: a, prio: 1}\n", "[0]")],
)
def test_a_bad_objectives_file_names_the_field(tmp_path, text, field):
    f = tmp_path / "objectives.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_objectives_file(f)
    assert e.value.field == field and str(f) in str(e.value)


# -- saturation and sheddable requests --------------------------------------------------------------


@pytest.mark.parametrize(("waiting", "kv"), [(5, 0.0), (0, 0.8), (9, 0.9)], ids=["queue", "kv-cache", "both"])
def test_a_sheddable_request_gets_429_while_the_pool_is_saturated(waiting, kv):
    director = make(waiting=waiting, kv=kv)
    stream = RequestStream(director)
    out = send_request(stream, completion_body(), extra={"x-gateway-inference-objective": "batch"})
    imm = immediate(out)
    assert imm is not None and imm.status.code == 429
    assert imm.body.startswith(b"inference error: InferencePoolResourceExhausted - ")
    assert dropped_reason(imm) == "rejected-saturated"
    stream.close()
    assert director.datastore.total_in_flight() == 0


@pytest.mark.parametrize("objective", ["interactive", "unknown", None])
def test_a_request_that_is_not_sheddable_is_never_refused_for_saturation(objective):
    director = make(waiting=100, kv=1.0)
    extra = {"x-gateway-inference-objective": objective} if objective else {}
    out = send_request(RequestStream(director), completion_body(), extra=extra)
    assert immediate(out) is None
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


def test_a_sheddable_request_is_routed_below_saturation():
    director = make(waiting=4, kv=0.7)  # 0.8 and 0.875 of the thresholds
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    assert immediate(out) is None


def test_stale_metrics_count_as_saturated():
    director = make(fresh=False)
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    assert immediate(out).status.code == 429


def test_pool_saturation_is_the_average_over_endpoints():
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
    now = time.monotonic()
    ds.update_metrics("10.0.0.1:8000", Metrics(waiting=10, updated_at=now))  # 2.0
    ds.update_metrics("10.0.0.2:8000", Metrics(kv_usage=0.0, updated_at=now))  # 0.0
    detector = SaturationDetector(ds)
    assert detector.saturation() == pytest.approx(1.0) and detector.saturated()
    assert not SaturationDetector(ds, SaturationConfig(queue_depth_threshold=20)).saturated()


def test_saturation_detector_config_uses_the_reference_names():
    cfg = SaturationConfig.from_config(
        {"queueDepthThreshold": 10, "kvCacheUtilThreshold": 0.9, "metricsStalenessThreshold": "200ms"}, "cfg.yaml"
    )
    assert cfg == SaturationConfig(10, 0.9, 0.2)
    with pytest.raises(ConfigError, match="saturationDetector.queueDepth"):
        SaturationConfig.from_config({"queueDepth": 1}, "cfg.yaml")
    with pytest.raises(ConfigError, match="saturationDetector.kvCacheUtilThreshold"):
        SaturationConfig.from_config({"kvCacheUtilThreshold": "lots"}, "cfg.yaml")


def test_an_empty_pool_is_503_for_sheddable_requests_too():
    director = make()
    director.datastore.set_endpoints([])
    out = send_request(RequestStream(director), completion_body(), extra={"x-gateway-inference-objective": "batch"})
    assert immediate(out).status.code == 503


# -- model rewrite: the request ----------------------------------------------------------------------


def test_rewrite_rule_changes_the_body_model_and_content_length_in_full_duplex():
    director = make(rules=ALIAS_RULES)
    stream = RequestStream(director)
    body = json.dumps({"model": "alias", "prompt": "Hello there", "max_tokens": 4}).encode()
    out = send_request(stream, body, chunk=7)
    sent = streamed_body(out)
    assert json.loads(sent) == {"model": "sim-model", "prompt": "Hello there", "max_tokens": 4}
    assert set_headers(out[0])["content-length"] == str(len(sent)) != str(len(body))
    assert out[-1].request_body.response.body_mutation.streamed_response.end_of_stream
    assert (stream.request.model, stream.request.target_model) == ("alias", "sim-model")


def test_rewrite_rule_changes_the_body_in_buffered_mode_with_a_body_mutation():
    director = make(rules=ALIAS_RULES)
    body = json.dumps({"model": "alias", "prompt": "Hello there"}).encode()
    out = send_request(RequestStream(director), body, mode=BUFFERED)
    common = out[-1].request_body.response
    assert json.loads(common.body_mutation.body) == {"model": "sim-model", "prompt": "Hello there"}
    headers = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert headers["content-length"] == str(len(common.body_mutation.body))
    assert headers["x-gateway-destination-endpoint"] in ADDRS


def test_without_a_rewrite_the_body_bytes_pass_unchanged():
    director = make(rules=ALIAS_RULES)
    body = b'{"model":  "m", "prompt": "x",   "max_tokens": 4}'
    out = send_request(RequestStream(director), body)
    assert streamed_body(out) == body  # not re-encoded: spacing kept
    out = send_request(RequestStream(director), body, mode=BUFFERED)
    assert not out[-1].request_body.response.HasField("body_mutation")


@pytest.mark.parametrize("header", ["x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite"])
def test_the_rewrite_header_names_the_target_and_wins_over_rules(header):
    director = make(rules=ALIAS_RULES)
    stream = RequestStream(director)
    body = json.dumps({"model": "alias", "prompt": "hi"}).encode()
    out = send_request(stream, body, extra={header: "other-model"})
    assert json.loads(streamed_body(out))["model"] == "other-model"


def test_weighted_targets_are_chosen_in_proportion():
    store = RewriteStore([Rule(("a",), (Target("x", 3), Target("y", 1), Target("z", 0)))], rng=random.Random(1))
    picks = [store.target("a") for _ in range(4000)]
    assert picks.count("z") == 0
    assert picks.count("x") / len(picks) == pytest.approx(0.75, abs=0.03)
    assert store.target("b") == "b"


def test_exact_matches_win_over_a_rule_without_matches_and_the_first_rule_wins():
    store = RewriteStore([Rule((), (Target("any"),)), Rule(("a",), (Target("x"),)), Rule(("a",), (Target("y"),))])
    assert store.target("a") == "x"
    assert store.target("b") == "any"


def test_rewrite_metrics_carry_the_target_model_name():
    director = make(rules=ALIAS_RULES)
    stream = RequestStream(director)
    send_request(stream, json.dumps({"model": "alias", "prompt": "hi"}).encode())
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b'{"model":"sim-model"}', True))
    text = director.metrics.exposition().decode()
    assert 'inference_objective_request_total{model_name="alias",target_model_name="sim-model"} 1.0' in text


def test_rewrites_file_takes_rules_or_whole_objects(tmp_path):
    f = tmp_path / "rewrites.yaml"
    f.write_text(
        "- matches: [{model: {value: alias}}]\n  targets: [{modelRewrite: sim-model, weight: 2}]\n"
    )
    assert load_rewrites_file(f) == [Rule(("alias",), (Target("sim-model", 2),))]
    f.write_text(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\nmetadata: {name: r}\n"
        "spec:\n  rules:\n  - matches: [{model: {type: Exact, value: a}}]\n    targets: [{modelRewrite: b}]\n"
    )
    assert load_rewrites_file(f) == [Rule(("a",), (Target("b", 1),))]
    f.write_text("- matches: [{model: {value: a}}]\n  targets: [{modelRewrite: b, weight: -1}]\n")
    with pytest.raises(ConfigError, match=r"rules\[0\].targets\[0\].weight"):
        load_rewrites_file(f)


# -- model rewrite: the reply ------------------------------------------------------------------------


def rewritten_stream(director=None, **hkw):
    stream = RequestStream(director or make(rules=ALIAS_RULES))
    send_request(stream, json.dumps({"model": "alias", "prompt": "hi", "stream": True}).encode(), **hkw)
    return stream


def response_bytes(out) -> bytes:
    return b"".join(r.response_body.response.body_mutation.streamed_response.body for r in out if r.HasField("response_body"))


def test_streamed_reply_says_the_requested_model_and_loses_content_length():
    stream = rewritten_stream()
    (hr,) = stream.handle(response_headers_msg(ctype="text/event-stream"))
    assert list(hr.response_headers.response.header_mutation.remove_headers) == ["content-length"]
    chunks = [
        b'data: {"id":"1","model":"sim-model","choices":[{"text":"a"}]}\n\n',
        b'data: {"id":"2","model": "sim-model","choices":[{"text":"b"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    out = []
    for i, c in enumerate(chunks):
        out += stream.handle(response_body_msg(c, i == len(chunks) - 1))
    got = response_bytes(out)
    assert got == b"".join(chunks).replace(b'"sim-model"', b'"alias"')


def test_a_model_name_split_across_reply_chunks_is_still_written_back():
    stream = rewritten_stream()
    stream.handle(response_headers_msg())
    whole = b'{"id":"x","object":"text_completion","model":"sim-model","choices":[{"text":"model sim-model"}]}'
    at = whole.index(b'"model"')
    cuts = [at + 3, at + 8, at + 12, at + 18]  # inside `"model"`, after the colon, inside the name, after it
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
    out = []
    for i, p in enumerate(pieces):
        out += stream.handle(response_body_msg(p, i == len(pieces) - 1))
    assert json.loads(response_bytes(out)) == {"id": "x", "object": "text_completion", "model": "alias",
                                               "choices": [{"text": "model sim-model"}]}  # fmt: skip


def test_only_a_possible_match_is_held_back_so_streamed_tokens_are_not_delayed():
    stream = rewritten_stream()
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    event = b'data: {"model":"sim-model","choices":[{"text":"a"}]}\n\n'
    (resp,) = stream.handle(response_body_msg(event, False))
    assert resp.response_body.response.body_mutation.streamed_response.body == event.replace(b"sim-model", b"alias")


def test_a_held_back_tail_goes_out_before_the_trailers():
    stream = rewritten_stream()
    stream.handle(response_headers_msg())
    out = stream.handle(response_body_msg(b'{"model":"sim-mo', False))
    assert response_bytes(out) == b"{"
    out = stream.handle(pb_trailers())
    assert response_bytes(out) == b'"model":"sim-mo'
    assert out[-1].HasField("response_trailers")


def pb_trailers():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def test_without_a_rewrite_the_reply_passes_untouched():
    director = make(rules=ALIAS_RULES)
    stream = RequestStream(director)
    send_request(stream, completion_body())
    (hr,) = stream.handle(response_headers_msg())
    assert not hr.response_headers.HasField("response")
    out = stream.handle(response_body_msg(b'{"model":"m"}', True))
    assert response_bytes(out) == b'{"model":"m"}'


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(max_size=40).map(lambda s: json.dumps(s)[1:-1].encode()),
    spaces=st.sampled_from([b"", b" ", b"  \n"]),
    cuts=st.lists(st.integers(0, 120), max_size=6),
)
def test_any_chunking_of_a_reply_gives_the_same_bytes_as_one_chunk(prefix, spaces, cuts):
    whole = b'{"p":"' + prefix + b'","model"' + spaces + b":" + spaces + b'"sim-model","x":"sim-model"}'
    points = sorted({c for c in cuts if c < len(whole)} | {0})
    pieces = [whole[a:b] for a, b in zip(points, points[1:] + [len(whole)])]
    restorer = ModelNameRestorer("alias", "sim-model")
    got = b"".join(restorer.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert got == ModelNameRestorer("alias", "sim-model").feed(whole, True)
    assert json.loads(got)["model"] == "alias" and json.loads(got)["x"] == "sim-model"


def test_a_requested_name_that_needs_json_escapes_is_written_back_escaped():
    restorer = ModelNameRestorer('my "quoted" \\ model', "sim-model")
    got = restorer.feed(b'{"model":"sim-model","other": {"model" : "sim-model"}}', True)
    assert json.loads(got) == {"model": 'my "quoted" \\ model', "other": {"model": 'my "quoted" \\ model'}}
