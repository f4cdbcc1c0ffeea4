"""Metrics, request logs and live views of a real EPP behind a real Envoy, checked against what the
simulators report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import yaml

from extproc.devstack.stack import LocalStack
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

SECRET = "sk-observability-secret-4242"


@pytest.fixture(scope="module")
def obs(tmp_path_factory) -> Iterator[LocalStack]:
    """Its own stack, so the counters start at zero; request logs on, as JSON."""
    # the GIE default config: the metrics below include its prefix-cache-scorer's 16-token blocks
    with make_stack(tmp_path_factory.mktemp("obs"), epp_args=("--strategy", "default", "--log-requests", "--log-format", "json")) as s:
        yield s


def scrape(stack: LocalStack) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def total(samples: dict[str, float], name: str, labels: str = "") -> float:
    return sum(v for k, v in samples.items() if re.match(rf"^{re.escape(name)}(\{{|$)", k) and labels in k)


def sim_stats(stack: LocalStack) -> list[dict]:
    out = []
    for port in stack.sim_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
            out.append(json.loads(r.read()))
    return out


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def admin(stack: LocalStack, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def test_token_sums_and_ttft_count_match_the_traffic(obs):
    client = openai.OpenAI(base_url=obs.base_url, api_key=SECRET)
    reported = {"prompt": 0, "completion": 0, "cached": 0}
    streamed = 0
    for i in range(4):  # non-streamed completions and chats
        c = client.completions.create(model=MODEL, prompt=f"count me {i} " * 30, max_tokens=3 + i)
        reported["prompt"] += c.usage.prompt_tokens
        reported["completion"] += c.usage.completion_tokens
        reported["cached"] += (c.usage.prompt_tokens_details.cached_tokens or 0) if c.usage.prompt_tokens_details else 0
    for i in range(5):  # streamed chats with usage
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"stream {i} " * 20}], max_tokens=4 + i,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage:
                reported["prompt"] += chunk.usage.prompt_tokens
                reported["completion"] += chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                reported["cached"] += (details.cached_tokens or 0) if details else 0
        streamed += 1
    labels = f'model_name="{MODEL}"'
    wait_for(lambda: total(scrape(obs), "inference_objective_output_tokens_count", labels) == 9)
    s = scrape(obs)
    assert total(s, "inference_objective_request_total", labels) == 9
    assert total(s, "inference_objective_output_tokens_sum", labels) == reported["completion"]
    assert total(s, "inference_objective_output_tokens_sum", labels) == sum(x["generation_tokens_total"] for x in sim_stats(obs))
    assert total(s, "inference_objective_input_tokens_sum", labels) == reported["prompt"]
    assert total(s, "inference_objective_prompt_cached_tokens_sum", labels) == reported["cached"]
    assert total(s, "inference_objective_request_ttft_seconds_count", labels) == streamed
    assert total(s, "inference_objective_request_tpot_seconds_count", labels) == streamed
    assert total(s, "inference_objective_request_duration_seconds_count", labels) == 9
    assert total(s, "inference_objective_running_requests") == 0
    assert total(s, "inference_extension_scheduler_e2e_duration_seconds_count") == 9
    assert total(s, "inference_extension_plugin_duration_seconds_count", 'plugin_name="max-score-picker"') == 9
    assert total(s, "inference_extension_prefix_indexer_size") > 0
    assert total(s, "inference_extension_prefix_indexer_hit_ratio_count") == 9


def test_request_log_lines_have_the_outcome_and_never_the_api_key(obs):
    client = openai.OpenAI(base_url=obs.base_url, api_key=SECRET)
    client.completions.create(model=MODEL, prompt="log me", max_tokens=2, extra_headers={"x-request-id": "obs-log-1", "x-api-key": SECRET})

    def line():
        for text in obs.epp_proc.log_path.read_text().splitlines():
            if text.startswith("{") and '"obs-log-1"' in text:
                return json.loads(text)
        return None

    wait_for(lambda: line() is not None)
    rec = line()
    assert rec["model"] == MODEL and rec["status"] == 200 and rec["endpoint"] in {f"{h}:{p}" for h, p in obs.endpoints}
    assert rec["completion_tokens"] == 2 and rec["duration_ms"] > 0
    assert SECRET not in obs.epp_proc.log_path.read_text()


def test_error_counters_move_on_400_and_model_server_errors(obs):
    before = scrape(obs)
    r = httpx.post(f"{obs.base_url}/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    for port in obs.sim_ports:
        httpx.post(f"http://127.0.0.1:{port}/sim/fault", json={"mode": "error"}, timeout=5)
    try:
        r = httpx.post(f"{obs.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code == 503  # from the simulator
    finally:
        for port in obs.sim_ports:
            httpx.post(f"http://127.0.0.1:{port}/sim/fault", json={"mode": "none"}, timeout=5)
    wait_for(lambda: total(scrape(obs), "inference_objective_request_error_total", 'error_code="ModelServerError"') == 1)
    after = scrape(obs)
    bad = 'error_code="BadRequest"'
    assert total(after, "inference_objective_request_error_total", bad) == total(before, "inference_objective_request_error_total", bad) + 1


def test_pool_gauges_match_the_simulators(obs):
    def sims():
        stats = sim_stats(obs)
        return (sum(x["kv_cache_usage_perc"] for x in stats) / len(stats), sum(x["waiting"] for x in stats) / len(stats),
                {x["name"]: x["waiting"] for x in stats})  # fmt: skip

    def epp():
        s = scrape(obs)
        per_pod = {re.search(r'model_server_pod="([^"]*)"', k).group(1): v for k, v in s.items() if k.startswith("inference_pool_per_pod_queue_size")}
        return (total(s, "inference_pool_average_kv_cache_utilization"), total(s, "inference_pool_average_queue_size"), per_pod,
                total(s, "inference_pool_ready_pods"))  # fmt: skip

    time.sleep(0.3)  # a few scrapes of the now-quiet pool
    kv, queue, _ = sims()
    epp_kv, epp_queue, per_pod, ready = epp()
    assert ready == len(obs.sim_ports) == len(per_pod)
    assert set(per_pod) == {f"sim-{i}" for i in range(len(obs.sim_ports))}
    assert epp_kv == pytest.approx(kv) and epp_queue == pytest.approx(queue)


def test_admin_views_and_epp_status_show_the_pool(obs):
    openai.OpenAI(base_url=obs.base_url, api_key=SECRET).completions.create(
        model=MODEL, prompt="decide " * 40, max_tokens=1, extra_headers={"x-request-id": "obs-decision-1"}
    )
    eps = admin(obs, "/debug/endpoints")["endpoints"]
    assert {e["address"] for e in eps} == {f"{h}:{p}" for h, p in obs.endpoints}
    assert all(e["healthy"] and e["last_scrape_age_s"] is not None and e["last_scrape_age_s"] < 2 for e in eps)
    assert sum(e["prefix_blocks"] for e in eps) > 0
    decisions = admin(obs, "/debug/decisions")["decisions"]
    mine = next(d for d in decisions if d["request_id"] == "obs-decision-1")
    assert mine["model"] == MODEL and mine["chosen"][0] in {e["address"] for e in eps} and mine["profile"] == "default"
    cfg = admin(obs, "/debug/config")
    assert cfg["scheduling_source"] == "strategy default" and cfg["options"]["log_requests"] is True
    out = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "status", "--url", f"http://127.0.0.1:{obs.epp_admin_port}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "endpoints: 3 (3 healthy)" in out
    for i in range(3):
        assert f"sim-{i}" in out
    assert "obs-decision-1" in out
    assert SECRET not in json.dumps([eps, decisions, cfg])


def test_429_and_503_from_the_epp_are_counted(tmp_path):
    # a filter no endpoint passes -> 429; then an empty pool -> 503
    config = yaml.safe_dump({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "by-label", "parameters": {"label": "tier", "validValues": ["gold"]}}, {"type": "max-score-picker"}],
    })  # fmt: skip
    with make_stack(tmp_path, sims=1, epp_args=("--config-text", config)) as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert httpx.post(f"{s.base_url}/completions", json=body, timeout=10).status_code == 429
        assert s.endpoints_path is not None
        s.endpoints_path.write_text("endpoints: []\n")
        wait_for(lambda: total(scrape(s), "inference_pool_ready_pods") == 0, timeout=10)
        assert httpx.post(f"{s.base_url}/completions", json=body, timeout=10).status_code == 503
        m = scrape(s)
        assert total(m, "inference_objective_request_error_total", 'error_code="InferencePoolResourceExhausted"') == 1
        assert total(m, "inference_objective_request_error_total", 'error_code="ServiceUnavailable"') == 1


class _Capture(BaseHTTPRequestHandler):
    """An upstream that records the headers it gets (and serves an empty /metrics to the scraper)."""

    seen: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _Capture.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"id": "x", "object": "text_completion", "model": MODEL, "choices": [],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_traceparent_reaches_the_upstream_untouched(tmp_path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        endpoints = tmp_path / "capture.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": [{"address": "127.0.0.1", "port": upstream.server_address[1], "name": "capture"}]}))
        with make_stack(tmp_path, endpoints_file=endpoints) as s:
            trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            r = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "trace me", "max_tokens": 1},
                           headers={"traceparent": trace, "tracestate": "vendor=1"}, timeout=10)  # fmt: skip
            assert r.status_code == 200
        (seen,) = _Capture.seen
        assert seen["traceparent"] == trace and seen["tracestate"] == "vendor=1"
    finally:
        upstream.shutdown()
