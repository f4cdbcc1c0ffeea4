"""What a client's strings may add to the EPP's state (extproc.observability.bounds): the caps, the
model-name limit of the body parser, and what /metrics, /debug/decisions and the logs hold after
hostile requests. The scrape off the event loop is here too: it reads what requests write."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.handlers.request_body import MAX_MODEL_CHARS
from extproc.handlers.request_stream import Outcome, RequestStream, State
from extproc.handlers.usage import Usage
from extproc.observability import bounds
from extproc.observability.bounds import CUT, LOG_FIELD_MAX, MAX_MODELS, MODEL_MAX, OVERFLOW, REPLACEMENT, bounded
from extproc.observability.logs import JsonFormatter, TextFormatter, setup_logging
from extproc.observability.metrics import EppMetrics
from extproc.server.admin import decisions_view
from pickers.framework import errors
from tests.unit.test_observability import make
from tests.unit.test_protocol import completion_body, response_body_msg, response_headers_msg, send_request

# docs/operating.md: the most /metrics can hold, whatever clients send (201 model pairs of the
# largest labels, every error code: about 32.4 MB)
EXPOSITION_BOUND = 36_000_000

UNPRINTABLE = ["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u202e", "\ufeff", "\ud800"]
HOSTILE_NAMES = [
    "x" * MAX_MODEL_CHARS,  # the longest name the parser takes
    "\U0001f600" * 1000,  # 4 bytes of UTF-8 each
    '"} 1e308\ninference_objective_request_total{model_name="forged"} 1',  # tries to end the line and forge a sample
    "\\" * 300,  # each one doubled by the format
    "a\x00b\rc\x1bd\u2028e\u202ef",
    " ",
    OVERFLOW,
]


def hostile_names() -> list[str]:
    return HOSTILE_NAMES + [f"model-{i:04d}" + "y" * (MODEL_MAX if i % 10 == 0 else 0) for i in range(MAX_MODELS + 100)]


def routed_with_model(director, model: str, rewrite: str = "", status: int = 404, request_id: str = "") -> RequestStream:
    """One request for `model` (rewritten to `rewrite` when given) answered `status` upstream."""
    stream = RequestStream(director)
    extra = {"x-gateway-model-name-rewrite": rewrite} if rewrite else {}
    if request_id:
        extra["x-request-id"] = request_id
    send_request(stream, completion_body(model=model), extra=extra)
    if stream.state is not State.REJECTED:
        stream.handle(response_headers_msg(status=status))
        stream.handle(response_body_msg(b"{}", True))
    stream.close()
    return stream


def model_labels(families) -> list[str]:
    return [v for fam in families for s in fam.samples for k, v in s.labels.items() if k in ("model_name", "target_model_name")]


# -- the caps ------------------------------------------------------------------------------------


def test_a_short_printable_string_is_kept_as_is():
    name = "meta-llama/Llama-3.1-8B-Instruct \"q\" \\ é 模型"
    assert bounded(name, MODEL_MAX) is name


def test_a_long_string_is_cut_to_its_cap_and_marked_as_cut():
    out = bounded("m" * 1_000_000, MODEL_MAX)
    assert len(out) == MODEL_MAX and out == "m" * (MODEL_MAX - 1) + CUT


def test_a_string_exactly_at_its_cap_is_not_cut():
    assert bounded("m" * MODEL_MAX, MODEL_MAX) == "m" * MODEL_MAX


@pytest.mark.parametrize("char", UNPRINTABLE, ids=[f"U+{ord(c):04X}" for c in UNPRINTABLE])
def test_an_unprintable_character_is_replaced(char):
    out = bounded(f"a{char}b", MODEL_MAX)
    assert out == f"a{REPLACEMENT}b"
    out.encode("utf-8")  # an unpaired surrogate would raise here


def test_unprintable_characters_in_the_kept_part_of_a_long_string_are_replaced():
    out = bounded("\n" * 10_000, 10)
    assert out == REPLACEMENT * 9 + CUT


@pytest.mark.parametrize(
    ("cut", "cap"),
    [(bounds.model_name, bounds.MODEL_MAX), (bounds.request_id, bounds.REQUEST_ID_MAX),
     (bounds.objective, bounds.OBJECTIVE_MAX), (bounds.message, bounds.MESSAGE_MAX)],
    ids=["model_name", "request_id", "objective", "message"],
)  # fmt: skip
def test_each_kind_of_string_has_its_cap(cut, cap):
    assert len(cut("z" * (cap + 1))) == cap and cut("z" * cap) == "z" * cap


# -- the parser ----------------------------------------------------------------------------------


def test_a_model_name_longer_than_the_parse_limit_is_refused_with_a_400_that_says_why():
    director, _, metrics, _ = make()
    stream = RequestStream(director)
    (out,) = send_request(stream, completion_body(model="x" * 1_000_000))
    assert out.immediate_response.status.code == 400
    assert f"at most {MAX_MODEL_CHARS}" in out.immediate_response.body.decode()
    assert stream.routing is None


def test_a_model_name_at_the_parse_limit_goes_upstream_whole_and_is_exported_cut():
    director, _, metrics, _ = make()
    name = "n" * MAX_MODEL_CHARS
    stream = RequestStream(director)
    out = send_request(stream, completion_body(model=name))
    upstream = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:])
    assert json.loads(upstream)["model"] == name
    assert set(model_labels(text_string_to_metric_families(metrics.exposition().decode()))) == {bounds.model_name(name)}


# -- /metrics ------------------------------------------------------------------------------------


def test_hostile_model_names_keep_the_exposition_small_parseable_and_its_labels_bounded():
    director, _, metrics, _ = make()
    names = hostile_names()
    for i, name in enumerate(names):
        routed_with_model(director, name, rewrite=names[-1 - i] if i % 3 == 0 else "", status=404 if i % 2 else 200)
    routed_with_model(director, "x" * 1_000_000)  # refused by the parser, counted as an error
    text = metrics.exposition()
    assert len(text) < EXPOSITION_BOUND
    families = list(text_string_to_metric_families(text.decode()))  # parses
    labels = model_labels(families)
    assert labels and all(len(v) <= MODEL_MAX and v.isprintable() for v in labels)
    assert "forged" not in labels
    (requests,) = [fam for fam in families if fam.name == "inference_objective_request"]
    pairs = {(s.labels["model_name"], s.labels["target_model_name"]) for s in requests.samples}
    assert len(pairs) == MAX_MODELS + 1 and (OVERFLOW, OVERFLOW) in pairs


def test_the_exposition_stays_under_its_bound_with_the_largest_labels_and_every_error_code():
    metrics = EppMetrics("pool")
    codes = [k.code for k in (errors.BAD_REQUEST, errors.PAYLOAD_TOO_LARGE, errors.NO_ENDPOINTS, errors.ALL_FILTERED, errors.PROTOCOL)]
    big = 1.2345678901234567e300  # the longest value a sample can print
    outcome = Outcome(status=503, streaming=True, usage=None, aborted=False, served=None, duration=big, first_byte=big / 2)
    usage = Usage(2**62, 2**62, 2**62)
    for i in range(MAX_MODELS + 50):
        model, target = f"{i:03d}" + "\U0001f600" * MODEL_MAX, f"{i:03d}" + "\\" * MODEL_MAX  # 4 and 2 bytes a character
        metrics.scheduled(model, big, target)
        metrics.completed(model, outcome, usage, target)
        for code in codes:
            metrics.request_error(model, code, target)
    assert len(metrics.exposition()) < EXPOSITION_BOUND


async def test_a_scrape_off_the_loop_gives_the_text_built_on_it():
    director, *_ = make()
    metrics = director.metrics
    for name in HOSTILE_NAMES:
        routed_with_model(director, name, status=200)
    assert await asyncio.shield(metrics.scrape()) == metrics.exposition()


async def test_scrapes_that_overlap_share_one_build():
    metrics = EppMetrics()
    first, second = metrics.scrape(), metrics.scrape()
    assert first is second
    await first
    assert metrics.scrape() is not first


async def test_a_scrape_sees_the_series_as_they_were_when_it_began():
    metrics = EppMetrics()
    metrics.scheduled("model-before", 0.001)
    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    executor.submit(gate.wait)  # the scrape's thread starts only once the loop has written below
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        building = metrics.scrape()
        metrics.scheduled("model-added-meanwhile", 0.001)  # a new series
        metrics.request_error("model-before", errors.BAD_REQUEST.code)  # a new error count
        gate.set()
        text = (await building).decode()
    finally:
        gate.set()
        executor.shutdown()
    assert 'model_name="model-before"' in text
    assert "model-added-meanwhile" not in text and "BadRequest" not in text
    assert "model-added-meanwhile" in metrics.exposition().decode()


# -- /debug/decisions and the logs ---------------------------------------------------------------


def test_decisions_keep_bounded_request_ids_and_model_names():
    director, *_ = make()
    stream = RequestStream(director)
    send_request(stream, completion_body(model="m" * MAX_MODEL_CHARS), extra={"x-request-id": "r\n" * 10_000})
    stream.close()
    send_request(RequestStream(director), b"{bad", extra={"x-request-id": "q" * 50_000})  # refused before routing
    for entry in decisions_view(director):
        assert len(entry["request_id"]) <= bounds.REQUEST_ID_MAX and entry["request_id"].isprintable()
        assert len(entry["model"]) <= MODEL_MAX


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_hostile_request_writes_one_bounded_log_line(log_stream, fmt):
    setup_logging(0, fmt, stream=log_stream)
    director, *_ = make(log_requests=True)
    rid = "id\nFAKE-2026-01-01-ERROR-forged-line" * 1000  # no space: the text format would not quote it
    routed_with_model(director, ("m\n" * MAX_MODEL_CHARS)[:MAX_MODEL_CHARS], rewrite="t\r" * 20_000, status=200, request_id=rid)
    routed_with_model(director, "\u2028" * 10, status=200)
    stream = RequestStream(director)
    send_request(stream, b"{bad", extra={"x-request-id": rid})
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    assert all(len(line) < 2 * (bounds.REQUEST_ID_MAX + 2 * MODEL_MAX + bounds.MESSAGE_MAX) + 600 for line in lines)
    assert not any(line.startswith("FAKE") for line in lines)


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_string_log_field_is_cut_and_cannot_end_its_line(formatter):
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
    record.fields = {"long": "FAKE line\n" * 10_000, "unquoted": "no-space\nFAKE-line"}
    line = formatter.format(record)
    assert "\n" not in line and len(line) < 3 * LOG_FIELD_MAX


def test_text_log_values_with_quotes_are_quoted(log_stream):
    setup_logging(0, "text", stream=log_stream)
    director, *_ = make(log_requests=True)
    routed_with_model(director, 'a"b', status=200)
    assert 'model="a\\"b"' in log_stream.getvalue()
