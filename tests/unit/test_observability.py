"""The EPP's metrics, request logs and live views, driven through RequestStream without a network."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.cli.status import endpoint_table, show_status
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import Outcome, RequestStream
from extproc.handlers.usage import Usage
from extproc.observability.logs import JsonFormatter, TextFormatter, setup_logging
from extproc.observability.metrics import MAX_MODELS, EppMetrics
from extproc.requestcontrol.director import DECISIONS_KEPT, Director
from extproc.server.admin import admin_app, endpoints_view, options_view
from extproc.server.runner import ServeOptions
from pickers.config.strategies import build_profile
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.framework.histogram import Histogram
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from tests.unit.test_protocol import completion_body, response_body_msg, response_headers_msg, send_request

ADDRS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def make(strategy="default", explain=False, log_requests=False):
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", a.split(":")[0], 8000, labels={"llm-d.ai/role": "decode"}) for i, a in enumerate(ADDRS))
    index = ApproxPrefixIndex()
    metrics = EppMetrics(pool_name="pool-a", datastore=ds, prefix_index=index)
    scheduler = Scheduler(build_profile(strategy, index), explain=explain, timer=metrics.plugin_timer)
    return Director(ds, scheduler, metrics, log_requests=log_requests), ds, metrics, index


def samples(metrics: EppMetrics) -> dict[str, float]:
    """name{labels} -> value, from the exposition text."""
    out = {}
    for line in metrics.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def value(metrics: EppMetrics, name: str, labels: str = "") -> float:
    return sum(v for k, v in samples(metrics).items() if re.match(rf"^{re.escape(name)}(\{{|$)", k) and labels in k)


SSE = (
    b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12,'
    b'"prompt_tokens_details":{"cached_tokens":3}}}\n\n'
    b"data: [DONE]\n\n"
)


def streamed_request(director, clock=None, request_id=None, extra=None):
    kw = {"clock": clock} if clock else {}
    stream = RequestStream(director, **kw)
    headers = {"x-request-id": request_id} if request_id else {}
    send_request(stream, completion_body(stream=True), extra={**headers, **(extra or {})})
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(SSE[:40], False))
    stream.handle(response_body_msg(SSE[40:], True))
    stream.close()


def json_request(director, status=200):
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(status=status))
    body = b'{"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}' if status == 200 else b"oops"
    stream.handle(response_body_msg(body, True))
    stream.close()


# -- histogram ---------------------------------------------------------------------------------
def test_histogram_buckets_are_cumulative_with_le_semantics():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert (h.count, h.sum) == (4, 6.0)


# -- request metrics -----------------------------------------------------------------------------
def test_streamed_request_records_ttft_tpot_duration_and_tokens():
    director, _, metrics, _ = make()
    ticks = iter([10.0, 10.2, 11.0])  # request headers, first response byte, end
    streamed_request(director, clock=lambda: next(ticks))
    labels = 'model_name="m",target_model_name="m"'
    assert value(metrics, "inference_objective_request_total", labels) == 1
    assert value(metrics, "inference_objective_request_ttft_seconds_count", labels) == 1
    assert value(metrics, "inference_objective_request_ttft_seconds_sum", labels) == pytest.approx(0.2)
    # 5 completion tokens: (1.0 - 0.2) s over the 4 after the first
    assert value(metrics, "inference_objective_request_tpot_seconds_sum", labels) == pytest.approx(0.2)
    assert value(metrics, "inference_objective_request_duration_seconds_sum", labels) == pytest.approx(1.0)
    assert value(metrics, "inference_objective_input_tokens_sum", labels) == 7
    assert value(metrics, "inference_objective_output_tokens_sum", labels) == 5
    assert value(metrics, "inference_objective_prompt_cached_tokens_sum", labels) == 3
    assert value(metrics, "inference_objective_running_requests") == 0


def test_non_streamed_request_has_duration_but_no_ttft():
    director, _, metrics, _ = make()
    json_request(director)
    assert value(metrics, "inference_objective_request_duration_seconds_count") == 1
    assert value(metrics, "inference_objective_request_ttft_seconds_count") == 0
    assert value(metrics, "inference_objective_output_tokens_sum") == 2


def test_error_counters_by_code():
    director, ds, metrics, _ = make()
    stream = RequestStream(director)
    send_request(stream, b"{not json")  # 400 from the EPP
    json_request(director, status=503)  # the model server failed
    ds.set_endpoints([])
    send_request(RequestStream(director), completion_body())  # 503: no endpoints
    assert value(metrics, "inference_objective_request_error_total", 'error_code="BadRequest"') == 1
    assert value(metrics, "inference_objective_request_error_total", 'error_code="ModelServerError"') == 1
    assert value(metrics, "inference_objective_request_error_total", 'error_code="ServiceUnavailable"') == 1
    assert value(metrics, "inference_objective_request_duration_seconds_count") == 0  # failures are not latencies


def test_aborted_stream_counts_ttft_but_not_duration_or_tpot():
    director, _, metrics, _ = make()
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"x":1}\n\n', False))
    stream.close()
    assert value(metrics, "inference_objective_request_ttft_seconds_count") == 1
    assert value(metrics, "inference_objective_request_duration_seconds_count") == 0
    assert value(metrics, "inference_objective_request_tpot_seconds_count") == 0
    assert value(metrics, "inference_objective_running_requests") == 0


def test_model_label_is_capped():
    metrics = EppMetrics()
    outcome = Outcome(status=200, streaming=False, usage=None, aborted=False, served=None, duration=0.1)
    for i in range(MAX_MODELS + 50):
        metrics.scheduled(f"model-{i}", 0.001)
        metrics.completed(f"model-{i}", outcome, None)
    models = {re.search(r'model_name="([^"]*)"', k).group(1) for k in samples(metrics) if k.startswith("inference_objective_request_total")}
    assert len(models) == MAX_MODELS + 1 and "other" in models
    assert value(metrics, "inference_objective_request_total", 'model_name="other"') == 50


# -- scrape-time gauges --------------------------------------------------------------------------
def test_pool_gauges_are_read_from_the_datastore_at_scrape_time():
    _, ds, metrics, _ = make()
    for i, (addr, waiting, kv) in enumerate(zip(ADDRS, (1, 2, 6), (0.1, 0.2, 0.6))):
        ds.update_metrics(addr, Metrics(waiting=waiting, kv_usage=kv, updated_at=time.monotonic()))
    s = samples(metrics)
    assert s['inference_pool_ready_pods{name="pool-a"}'] == 3
    for prefix in ("inference_pool_", "llm_d_epp_"):  # GIE's names and llm-d's (what a peer cluster's EPP reads)
        assert s[prefix + 'average_queue_size{name="pool-a"}'] == pytest.approx(3.0)
        assert s[prefix + 'average_kv_cache_utilization{name="pool-a"}'] == pytest.approx(0.3)
    assert s['inference_pool_per_pod_queue_size{model_server_pod="pod-2",name="pool-a"}'] == 6
    ds.set_endpoints([])
    assert samples(metrics)['inference_pool_ready_pods{name="pool-a"}'] == 0


def test_pool_means_are_over_fresh_endpoints_and_absent_without_any():
    _, ds, metrics, _ = make()
    now = time.monotonic()
    ds.update_metrics(ADDRS[0], Metrics(waiting=4, kv_usage=0.4, updated_at=now))
    ds.update_metrics(ADDRS[1], Metrics(waiting=0, kv_usage=0.0, updated_at=now - 60))  # stale: left out
    s = samples(metrics)
    assert s['llm_d_epp_average_queue_size{name="pool-a"}'] == pytest.approx(4.0)
    assert s['llm_d_epp_average_kv_cache_utilization{name="pool-a"}'] == pytest.approx(0.4)
    ds.update_metrics(ADDRS[0], Metrics(waiting=4, kv_usage=0.4, updated_at=now - 60))
    s = samples(metrics)  # no endpoint with fresh metrics: no mean, so a peer does not see an idle pool
    assert not any("average_" in k for k in s)
    assert s['inference_pool_ready_pods{name="pool-a"}'] == 3


def test_prefix_index_size_and_hit_ratio():
    director, _, metrics, index = make()
    prompt = "the same long prompt " * 20
    for _ in range(2):
        stream = RequestStream(director)
        send_request(stream, completion_body(prompt=prompt))
        stream.close()
    blocks = len(block_hashes("m", prompt))
    assert value(metrics, "inference_extension_prefix_indexer_size") == blocks == index.size()
    # the first lookup found nothing, the second everything
    assert value(metrics, "inference_extension_prefix_indexer_hit_ratio_count") == 2
    assert value(metrics, "inference_extension_prefix_indexer_hit_ratio_sum") == 1.0


def test_scheduler_and_plugin_durations_are_recorded_per_plugin():
    director, _, metrics, _ = make()
    json_request(director)
    assert value(metrics, "inference_extension_scheduler_e2e_duration_seconds_count") == 1
    s = samples(metrics)
    timed = {re.search(r'plugin_name="([^"]*)"', k).group(1) for k in s if k.startswith("inference_extension_plugin_duration_seconds_count")}
    assert timed == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "max-score-picker"}
    assert 'extension_point="Picker"' in next(k for k in s if "max-score-picker" in k)
    assert s['inference_extension_info{build_ref="%s",commit=""}' % metrics.version] == 1


def test_timing_leaves_the_plugins_as_they_are_and_times_a_shared_plugin_once():
    director, _, metrics, _ = make()
    prof = director.scheduler.profile
    scorer = prof.scorers[2].scorer
    assert type(scorer).__name__ == "PrefixCacheScorer"  # the plugin itself, no wrapper
    twice = Scheduler([prof, type(prof)("again", prof.picker, prof.scorers, prof.filters)],
                      handler=_RunBoth(), timer=metrics.plugin_timer)
    twice.schedule(InferenceRequest("r", "/v1/completions", {}, "completions", "m", "hello"), director.datastore.candidates())
    counts = {k: v for k, v in samples(metrics).items()
              if k.startswith("inference_extension_plugin_duration_seconds_count") and "prefix-cache-scorer" in k}
    assert list(counts.values()) == [2.0]  # one series for the shared plugin, observed once per profile run


class _RunBoth:
    type = name = "run-both"

    def pick(self, request, cycle, profiles, results):  # type: ignore[no-untyped-def]
        return [] if results else list(profiles.values())

    def process_results(self, request, cycle, results):  # type: ignore[no-untyped-def]
        from pickers.framework.types import SchedulingResult

        return SchedulingResult(results["again"], "again")


# -- request logs --------------------------------------------------------------------------------
def test_request_logs_are_off_by_default(log_stream):
    setup_logging(0, "json", stream=log_stream)
    director, *_ = make()
    streamed_request(director)
    assert log_stream.getvalue() == ""


def test_json_request_log_has_the_decision_and_outcome_and_no_secrets(log_stream):
    setup_logging(0, "json", stream=log_stream)
    director, *_ = make(log_requests=True)
    secret = {"authorization": "Bearer sk-very-secret", "x-api-key": "key-very-secret", "api-key": "key-very-secret"}
    streamed_request(director, request_id="req-7", extra=secret)
    (line,) = log_stream.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["logger"] == "llm_epp.requests" and rec["level"] == "INFO"
    assert rec["request_id"] == "req-7" and rec["model"] == "m" and rec["profile"] == "default"
    assert rec["endpoint"] in ADDRS and rec["status"] == 200 and rec["aborted"] is False
    assert rec["duration_ms"] >= rec["first_byte_ms"] >= 0 and rec["completion_tokens"] == 5
    assert "scores" not in rec  # INFO: no scores
    assert "very-secret" not in log_stream.getvalue()


def test_debug_request_log_adds_scores_and_still_no_secrets(log_stream):
    setup_logging(1, "json", stream=log_stream)
    director, *_ = make(explain=True, log_requests=True)
    streamed_request(director, request_id="req-8", extra={"authorization": "Bearer sk-very-secret"})
    text = log_stream.getvalue()
    assert "very-secret" not in text
    rec = next(json.loads(line) for line in text.splitlines() if json.loads(line).get("msg") == "request")
    assert set(rec["scores"]["total"]) == set(ADDRS)


def test_rejected_request_is_logged_with_its_code(log_stream):
    setup_logging(0, "text", stream=log_stream)
    director, *_ = make(log_requests=True)
    send_request(RequestStream(director), b"{bad", extra={"x-request-id": "bad-1", "authorization": "Bearer sk-very-secret"})
    text = log_stream.getvalue()
    assert "request rejected" in text and "request_id=bad-1" in text and "error_code=BadRequest" in text
    assert "very-secret" not in text


def test_formatters_render_fields():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    record.fields = {"a": 1, "b": "two words"}
    assert json.loads(JsonFormatter().format(record))["b"] == "two words"
    assert TextFormatter().format(record).endswith('hello there a=1 b="two words"')


# -- live views ----------------------------------------------------------------------------------
def test_decisions_ring_is_bounded_and_holds_rejections():
    director, ds, *_ = make()
    for _ in range(DECISIONS_KEPT + 5):
        json_request(director)
    send_request(RequestStream(director), b"{bad")
    assert len(director.decisions) == DECISIONS_KEPT
    assert director.decisions[-1][-1] == "BadRequest"


def test_endpoints_view_shows_state_per_endpoint():
    director, ds, _, index = make()
    stream = RequestStream(director)
    send_request(stream, completion_body(prompt="x" * 640))  # in flight, 10 blocks recorded
    ds.update_metrics(ADDRS[0], Metrics(waiting=2, running=1, kv_usage=0.25, updated_at=1.0))
    view = {e["address"]: e for e in endpoints_view(ds, index)}
    assert sum(e["in_flight"] for e in view.values()) == 1
    assert sum(e["prefix_blocks"] for e in view.values()) == 10
    first = view[ADDRS[0]]
    assert (first["name"], first["role"], first["waiting"], first["kv_usage"]) == ("pod-0", "decode", 2, 0.25)
    assert first["stale"] and not first["healthy"]  # scraped long ago (monotonic 1.0)
    assert view[ADDRS[1]]["last_scrape_age_s"] is None  # never scraped


def test_endpoints_view_and_epp_status_show_data_parallel_ranks():
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("p-rank-0", "10.0.0.1", 8000, rank=0, dp_group="ns/p"),
                      EndpointSpec("p-rank-3", "10.0.0.1", 8003, rank=3, dp_group="ns/p"),
                      EndpointSpec("solo", "10.0.0.2", 8000)])  # fmt: skip
    view = endpoints_view(ds, None)
    assert [(e["rank"], e["dp_group"]) for e in view] == [(0, "ns/p"), (3, "ns/p"), (0, "")]
    lines = endpoint_table(view).splitlines()
    assert lines[0].split()[:5] == ["NAME", "ADDRESS", "ROLE", "RANK", "DP"]
    assert lines[2].split()[:5] == ["p-rank-3", "10.0.0.1:8003", "-", "3", "ns/p"]
    assert lines[3].split()[:5] == ["solo", "10.0.0.2:8000", "-", "0", "-"]


def test_epp_status_leaves_the_rank_columns_out_without_ranks():
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    view = endpoints_view(ds, None)
    assert "RANK" not in endpoint_table(view)
    old_epp = [{k: v for k, v in e.items() if k not in ("rank", "dp_group")} for e in view]
    assert endpoint_table(old_epp) == endpoint_table(view)


async def test_admin_app_serves_the_three_views_and_epp_status_prints_them(capsys):
    director, ds, _, index = make(explain=True)
    json_request(director)
    config = {"version": "t", "options": options_view(ServeOptions())}
    async with TestClient(TestServer(admin_app(ds, index, director, config))) as client:
        eps = await (await client.get("/debug/endpoints")).json()
        cfg = await (await client.get("/debug/config")).json()
        dec = await (await client.get("/debug/decisions?limit=5")).json()
        assert (await client.get("/debug/decisions?limit=x")).status == 400
        url = str(client.make_url("")).rstrip("/")
        out = io.StringIO()
        # epp status is synchronous (urllib): run it off the loop that serves the views
        rc = await asyncio.to_thread(show_status, url, decisions=5, out=out)
    assert [e["address"] for e in eps["endpoints"]] == ADDRS
    assert cfg["options"]["admin_address"] == "127.0.0.1"
    assert [s["type"] for s in cfg["scheduling"]["profiles"][0]["scorers"]] == [
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]  # fmt: skip
    (d,) = dec["decisions"]
    assert d["chosen"][0] in ADDRS and d["profile"] == "default" and set(d["scores"]["total"]) == set(ADDRS)
    text = out.getvalue()
    assert rc == 0 and "endpoints: 3" in text and "pod-0" in text and "PREFIX BLOCKS" in text and d["request_id"] in text


def test_epp_status_says_when_it_cannot_connect(capsys):
    assert show_status("http://127.0.0.1:9", out=io.StringIO()) == 1
    assert "cannot read" in capsys.readouterr().err


def test_usage_decode_matches_what_the_metrics_read():
    u = msgspec.json.decode(b'{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}', type=Usage)
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (3, 2, 1)


def test_runtime_view_reports_process_numbers():
    from extproc.server.admin import runtime_view

    ds = Datastore()
    ds.set_endpoints([EndpointSpec("10.0.0.1:8000", "10.0.0.1", 8000)])
    index = ApproxPrefixIndex(default_capacity=10)
    index.record("10.0.0.1:8000", [1, 2, 3])
    view = runtime_view(ds, index, lambda: {"active_streams": 0})
    assert view["in_flight"] == view["in_flight_tokens"] == view["active_streams"] == 0
    assert (view["prefix_index_size"], view["prefix_index_bound"]) == (3, 10)
    assert view["asyncio_tasks"] == 0  # no running loop here
    assert view["rss_kib"] is None or view["rss_kib"] > 0
