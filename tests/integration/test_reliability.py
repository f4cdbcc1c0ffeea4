"""Faults through the real stack (Envoy + EPP + simulators): the EPP down, killed, hanging or
restarting under load; endpoints that die, hang, answer 5xx or serve garbage metrics; clients that
try to steer; TLS between Envoy and the EPP. Loads are paced and stop by themselves (bench.faults)."""

from __future__ import annotations

import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import faults
from extproc.observability.bounds import CUT, MODEL_MAX
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy
LOAD_S = 3.0


# -- the EPP fails ------------------------------------------------------------------------------


def test_fail_open_buffered_loses_nothing_when_the_epp_is_killed_under_load(tmp_path):
    res = faults.epp_outage(tmp_path, fail_open=True, body_mode="BUFFERED", how="kill", seconds=LOAD_S)
    assert res.sent > 50
    assert (res.failed, res.lost) == (0, 0), res
    assert res.recovered_s < 2.5  # Envoy's health check (1 s) sees the EPP back


def test_fail_open_buffered_serves_past_an_epp_that_never_answers(tmp_path):
    # The stand-in EPP is healthy but silent: each request waits message_timeout (1 s), then fails open.
    res = faults.epp_outage(tmp_path, fail_open=True, body_mode="BUFFERED", how="hang", seconds=LOAD_S)
    assert (res.failed, res.lost) == (0, 0), res
    assert res.recovered_s < 2.5


def test_fail_open_full_duplex_loses_nothing_on_a_graceful_epp_restart(tmp_path):
    # --shutdown-delay: the EPP reports NOT_SERVING and keeps its port open past Envoy's health-check
    # interval, so no full-duplex body is ever streamed to a closed port.
    res = faults.epp_outage(tmp_path, fail_open=True, body_mode="FULL_DUPLEX_STREAMED", how="stop", seconds=LOAD_S)
    assert (res.failed, res.lost) == (0, 0), res
    assert res.recovered_s < 2.5


def test_fail_open_full_duplex_serves_every_request_once_envoy_knows_the_epp_is_down(tmp_path):
    with make_stack(tmp_path, sims=2, failure_mode_allow=True) as s:
        s.stop_epp()
        _wait_epp_unhealthy(s)
        statuses = [_post(s).status_code for _ in range(30)]
        assert statuses == [200] * 30


def test_fail_close_answers_5xx_while_the_epp_is_down_and_recovers(tmp_path):
    res = faults.epp_outage(tmp_path, fail_open=False, body_mode="FULL_DUPLEX_STREAMED", how="kill", seconds=LOAD_S)
    assert res.lost == 0, res.lost_because
    assert res.failed > 0
    assert all(500 <= code < 600 for code in res.statuses if code != 200), res.statuses
    assert res.recovered_s < 2.5


def _post(s, **headers):
    return httpx.post(f"{s.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, headers=headers, timeout=10)


def _wait_epp_unhealthy(s, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/clusters", timeout=5) as r:
            flags = [line for line in r.read().decode().splitlines() if line.startswith("llm-epp::") and "::health_flags::" in line]
        if flags and "healthy" != flags[0].rsplit("::", 1)[1]:
            return
        time.sleep(0.1)
    raise AssertionError("Envoy never marked the EPP unhealthy")


# -- clients cannot steer -------------------------------------------------------------------------


class _Trap(BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self):  # noqa: N802
        type(self).hits += 1
        self.send_response(200)
        self.send_header("x-served-by", "trap")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("options", "epp_down"),
    [
        ({}, False),
        ({"request_body_mode": "BUFFERED", "response_body_mode": "STREAMED"}, False),
        ({"failure_mode_allow": True}, True),
        ({"failure_mode_allow": True, "request_body_mode": "BUFFERED", "response_body_mode": "STREAMED"}, True),
        ({"override_host": True, "epp_args": ("--max-num-endpoints", "2")}, False),
        ({"override_host": True, "failure_mode_allow": True}, True),
    ],
    ids=["full-duplex", "buffered", "fail-open-epp-down", "fail-open-buffered-epp-down", "override-host", "override-host-epp-down"],
)
def test_spoofed_steering_headers_are_ignored(tmp_path, options, epp_down):
    trap = ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    _Trap.hits = 0
    spoof = f"127.0.0.1:{trap.server_address[1]}"
    try:
        with make_stack(tmp_path, sims=2, **options) as s:
            pool = {f"{h}:{p}" for h, p in s.endpoints}
            if epp_down:
                s.stop_epp()
                _wait_epp_unhealthy(s)
            for header in ("x-gateway-destination-endpoint", "X-Gateway-Destination-Endpoint", "x-prefiller-host-port"):
                for value in (spoof, f"{spoof},{spoof}"):
                    r = _post(s, **{header: value, "x-gateway-destination-endpoint-subset": spoof})
                    assert r.status_code == 200, r.text
                    assert r.headers["x-served-by"] in pool
        assert _Trap.hits == 0
    finally:
        trap.shutdown()


# -- clients cannot grow the EPP's state ------------------------------------------------------------


def test_a_1_mb_model_name_neither_bloats_the_metrics_nor_breaks_routing(tmp_path):
    with make_stack(tmp_path, sims=2) as s:
        huge = httpx.post(f"{s.base_url}/completions", json={"model": "x" * 1_000_000, "prompt": "x", "max_tokens": 1}, timeout=30)
        long = httpx.post(f"{s.base_url}/completions", json={"model": "y" * 4000, "prompt": "x", "max_tokens": 1}, timeout=30)
        scrape = httpx.get(f"http://127.0.0.1:{s.epp_metrics_port}/metrics", timeout=30)
        after = _post(s)
        decisions = httpx.get(f"http://127.0.0.1:{s.epp_admin_port}/debug/decisions", timeout=10).json()["decisions"]
    # Three model pairs of ~25 KB each (the bound, whatever clients send, is 36 MB; before: 283 MB per 1 MB name).
    assert scrape.status_code == 200 and len(scrape.content) < 1_000_000
    labels = {v for fam in text_string_to_metric_families(scrape.text) for x in fam.samples for k, v in x.labels.items() if k == "model_name"}
    assert "y" * 127 + CUT in labels and all(len(v) <= MODEL_MAX for v in labels)
    assert after.status_code == 200, after.text
    assert all(len(d["model"]) <= MODEL_MAX for d in decisions)
    assert huge.status_code == 400 and "at most 4096 are accepted" in huge.text
    assert long.status_code == 404  # routed with its real name: the model server knows no such model


# -- endpoint faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "error", "hang", "garbage-metrics"])
def test_a_failing_endpoint_stops_getting_requests_within_one_staleness_interval(tmp_path, fault):
    # --metrics-staleness-threshold 0.5s; round-robin would keep sending it every other request.
    res = faults.endpoint_fault(tmp_path, fault=fault, override_host=False, seconds=LOAD_S)
    assert res.isolated_s < 0.5 + 0.3, res  # the threshold plus a scrape interval and scheduling slack
    if fault != "kill":
        assert res.recovered_s < 1.0, res  # the first good scrape brings it back
    if fault == "garbage-metrics":
        assert (res.failed, res.lost) == (0, 0)  # its API still answers: isolated, nothing lost


@pytest.mark.parametrize("fault", ["kill", "error"])
def test_fallback_endpoints_lose_no_request_to_a_dead_or_erroring_endpoint(tmp_path, fault):
    # Envoy's override-host policy retries connect failures and 502/503/504 on the EPP's next endpoint.
    res = faults.endpoint_fault(tmp_path, fault=fault, override_host=True, seconds=LOAD_S)
    assert (res.failed, res.lost) == (0, 0), res


# -- TLS between Envoy and the EPP ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["self-signed", "verified"])
def test_envoy_reaches_the_epp_over_tls(tmp_path, mode):
    with make_stack(tmp_path, sims=1, epp_tls=mode) as s:
        r = _post(s, **{"x-request-id": "tls-1"})
        assert r.status_code == 200
        time.sleep(0.3)
        assert any(e["request_id"] == "tls-1" and e["destination"] for e in s.access_log())  # the EPP routed it
        with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/stats?filter=cluster.llm-epp.ssl.handshake", timeout=5) as st:
            handshakes = int(st.read().decode().split(":")[1])
        assert handshakes >= 1


def test_a_plaintext_client_cannot_use_the_tls_port(tmp_path):
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    with make_stack(tmp_path, sims=1, epp_tls="self-signed") as s:
        with grpc.insecure_channel(f"127.0.0.1:{s.epp_port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            with pytest.raises(grpc.RpcError):
                list(stub.Process(iter([pb.ProcessingRequest()]), timeout=3))


# -- secrets ----------------------------------------------------------------------------------------


def test_credentials_never_reach_the_logs(tmp_path):
    secret = "sk-llm-epp-test-SECRET-0123456789"
    with make_stack(tmp_path, sims=1, epp_args=("-v", "2", "--explain-scores")) as s:
        r = _post(s, authorization=f"Bearer {secret}", **{"x-api-key": secret, "api-key": secret})
        assert r.status_code == 200
        # an error path logs too
        bad = httpx.post(f"{s.base_url}/completions", content=b"{oops", headers={"authorization": f"Bearer {secret}"}, timeout=10)
        assert bad.status_code == 400
        time.sleep(0.5)
        epp_log = s.epp_proc.log_path.read_text()
        access_log = s.access_log_path.read_text()
    assert epp_log and access_log
    assert secret not in epp_log
    assert secret not in access_log
