"""Real Envoy -> llm-epp -> simulated vLLM pool, driven with the openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, epp_metric, make_stack

pytestmark = pytest.mark.envoy


def pool(stack) -> set[str]:
    return {f"{h}:{p}" for h, p in stack.endpoints}


def log_for(stack, request_id: str, timeout: float = 5.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # Envoy flushes its access log on a timer
        for entry in stack.access_log():
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} not in the access log")


def test_completion_lands_on_the_endpoint_the_epp_chose(stack):
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Tell me a story about routing", max_tokens=5, extra_headers={"x-request-id": "chosen-1"}
    )
    completion = raw.parse()
    assert completion.usage.completion_tokens == 5
    served = raw.headers["x-served-by"]
    entry = log_for(stack, "chosen-1")
    assert entry["destination"] == served == entry["upstream"]
    assert served in pool(stack)


def shared_prefix_run(stack, n: int = 6) -> tuple[set[str], list[int]]:
    """`n` chats that share a ~1,800-character system prompt: (servers that answered, cached prompt tokens each)."""
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    system = "You are a careful assistant. " * 60  # 7 blocks of 64 tokens
    served, cached = set(), []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}], max_tokens=2
        )
        served.add(raw.headers["x-served-by"])
        cached.append(raw.parse().usage.prompt_tokens_details.cached_tokens)
    return served, cached


def test_same_long_prefix_sticks_to_one_endpoint_and_hits_its_cache(stack):
    served, cached = shared_prefix_run(stack)
    assert len(served) == 1
    assert all(c > 0 for c in cached[1:])


def test_streaming_chat_with_usage_is_counted(stack):
    before = epp_metric(stack, "inference_objective_output_tokens_sum")
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream please"}],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 7
    deadline = time.monotonic() + 5
    while epp_metric(stack, "inference_objective_output_tokens_sum") < before + 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert epp_metric(stack, "inference_objective_output_tokens_sum") == before + 7


class _Trap(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spoofed_destination_header_does_not_move_the_request(stack):
    trap = ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        spoof = f"127.0.0.1:{trap.server_address[1]}"
        for header in ("x-gateway-destination-endpoint", "X-Gateway-Destination-Endpoint"):
            r = httpx.post(
                f"{stack.base_url}/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                headers={header: spoof, "x-prefiller-host-port": spoof},
                timeout=10,
            )
            assert r.status_code == 200
            assert r.headers["x-served-by"] in pool(stack)
        assert _Trap.hits == 0
    finally:
        trap.shutdown()


def test_body_sent_in_many_small_chunks_routes(stack):
    body = json.dumps({"model": MODEL, "prompt": "chunky " * 2000, "max_tokens": 2}).encode()

    def chunks():
        for i in range(0, len(body), 97):
            yield body[i : i + 97]

    r = httpx.post(f"{stack.base_url}/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 3000


def test_8_mib_body_routes(stack):
    body = {"model": MODEL, "prompt": "short prompt", "max_tokens": 1, "user": "u" * (8 * 1024 * 1024)}
    r = httpx.post(f"{stack.base_url}/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text[:200]
    assert r.headers["x-served-by"] in pool(stack)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"model": "sim-model", "prompt": ', "not valid JSON"),
        (b'{"prompt": "no model here"}', "model not found in request body"),
        (b'{"model": "sim-model"}', "'prompt' is required"),
    ],
)
def test_bad_requests_get_400_from_the_epp(stack, body, fragment):
    r = httpx.post(f"{stack.base_url}/completions", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert r.text.startswith("inference error: BadRequest - ")
    assert fragment in r.text
    assert "x-served-by" not in r.headers


def test_get_requests_pass_through_to_the_pool(stack):
    r = httpx.get(f"{stack.base_url}/models", timeout=10)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL


def test_killed_stream_does_not_leak_in_flight(stack):
    body = json.dumps(
        {"model": MODEL, "prompt": "a long answer please", "max_tokens": 2000, "stream": True}
    ).encode()
    req = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=10) as s:
            s.sendall(req)
            assert b"200 OK" in s.recv(4096)  # streaming has begun
            assert epp_metric(stack, "inference_objective_running_requests") >= 1
        # the client is gone; Envoy resets the ext_proc stream and the EPP settles its books
    deadline = time.monotonic() + 10
    while epp_metric(stack, "inference_objective_running_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert epp_metric(stack, "inference_objective_running_requests") == 0


def test_empty_pool_is_503(tmp_path):
    endpoints = tmp_path / "empty.yaml"
    endpoints.write_text("endpoints: []\n")
    with make_stack(tmp_path, endpoints_file=endpoints) as s:
        r = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert r.status_code == 503
        assert r.text.startswith("inference error: ServiceUnavailable - ")
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"


def test_buffered_body_mode_routes_too(tmp_path):
    with make_stack(tmp_path, sims=2, request_body_mode="BUFFERED", response_body_mode="STREAMED") as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused")
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="buffered", max_tokens=2, user="u" * (3 * 1024 * 1024)  # over Envoy's 1 MiB default
        )
        assert raw.headers["x-served-by"] in pool(s)
        stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True)
        assert len([c for c in stream if c.choices]) == 3
        r = httpx.post(f"{s.base_url}/completions", content=b"{oops", timeout=10)
        assert r.status_code == 400


def test_fail_open_serves_from_the_pool_when_the_epp_is_down(tmp_path):
    # BUFFERED: what `epp up --fail-open` uses; full-duplex and faults under load are in test_reliability.py.
    with make_stack(tmp_path, sims=2, failure_mode_allow=True, request_body_mode="BUFFERED") as s:
        s.stop_epp()
        for _ in range(5):
            r = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
            assert r.status_code == 200
            assert r.headers["x-served-by"] in pool(s)


def test_fail_close_gives_a_5xx_when_the_epp_is_down(tmp_path):
    with make_stack(tmp_path, sims=1) as s:
        s.stop_epp()
        r = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
        assert 500 <= r.status_code < 600
        assert "x-served-by" not in r.headers


def test_epp_restart_is_picked_up_by_envoy(tmp_path):
    with make_stack(tmp_path, sims=1) as s:
        s.stop_epp()
        s.start_epp()
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200


def test_round_robin_strategy_spreads_evenly(tmp_path):
    with make_stack(tmp_path, epp_args=("--strategy", "round-robin")) as s:
        served = [
            httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "same", "max_tokens": 1}, timeout=10).headers[
                "x-served-by"
            ]
            for _ in range(9)
        ]
        assert {a: served.count(a) for a in pool(s)} == {a: 3 for a in pool(s)}


def test_grpc_health_reports_every_service(stack):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.epp_health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_open_streams(tmp_path):
    import signal

    with make_stack(tmp_path, sims=1, sim_args=("--time-scale", "0.3")) as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="unused")
        stream = client.completions.create(model=MODEL, prompt="drain me", max_tokens=600, stream=True)
        first = next(iter(stream))  # ~1.5 s of tokens still to come
        assert first.choices
        s.epp_proc.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert s.epp_proc.popen.poll() is None  # still draining
        rest = [c for c in stream if c.choices]
        assert len(rest) == 599  # every token arrived although the EPP was told to stop
        assert s.epp_proc.popen.wait(15) == 0
        assert "draining 1 open streams" in s.epp_proc.log_path.read_text()


def test_fallback_list_lets_envoy_retry_past_a_dead_endpoint(tmp_path):
    # Envoy's override-host policy reads the EPP's ordered list; round-robin makes the dead
    # endpoint the primary for every third request, before the scraper has noticed it is gone.
    with make_stack(tmp_path, epp_args=("--strategy", "round-robin", "--max-num-endpoints", "2"), override_host=True) as s:
        dead = s.procs[0]
        dead_addr = f"127.0.0.1:{s.sim_ports[0]}"
        dead.stop()
        ids = [f"fb-{i}" for i in range(6)]
        for rid in ids:
            r = httpx.post(
                f"{s.base_url}/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                headers={"x-request-id": rid},
                timeout=10,
            )
            assert r.status_code == 200
            assert r.headers["x-served-by"] != dead_addr
        entries = [log_for(s, rid) for rid in ids]
        retried = [e for e in entries if e["destination"].split(",")[0] == dead_addr]
        assert retried, "the dead endpoint was never primary"
        assert all(e["upstream"] == e["destination"].split(",")[1] for e in retried)


def test_prefill_servers_in_an_endpoints_file_stay_out_of_envoys_routes(tmp_path):
    from extproc.devstack.stack import LocalStack, StackOptions

    endpoints = tmp_path / "pd.yaml"
    endpoints.write_text(
        "endpoints:\n"
        "- {address: 127.0.0.1, port: 9101, labels: {llm-d.ai/role: prefill}}\n"
        "- {address: 127.0.0.1, port: 9102, labels: {llm-d.ai/role: decode}}\n"
    )
    stack = LocalStack(StackOptions(workdir=tmp_path, endpoints_file=endpoints))
    stack.use_endpoints_file(endpoints)
    assert stack.serving_endpoints == [("127.0.0.1", 9102)]
