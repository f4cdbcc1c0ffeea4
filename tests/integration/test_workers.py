"""`epp serve --workers 2` behind real Envoy: the kernel spreads Envoy's connections over both worker
processes (SO_REUSEPORT), every pick is the parent's, the metrics count each request once, and a
worker that dies is started again while the other serves."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import MODEL, epp_metric, make_stack


@pytest.fixture(scope="module")
def workers_stack(tmp_path_factory):
    # one Envoy thread: its connections (8 streams each at most) must still reach both workers
    with make_stack(tmp_path_factory.mktemp("workers"), epp_workers=2, envoy_concurrency=1) as s:
        yield s


def _complete(stack, i: int) -> int:
    body = json.dumps({"model": MODEL, "prompt": f"request {i % 7} " * 40, "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{stack.base_url}/completions", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _runtime(stack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/runtime", timeout=5) as r:
        return json.loads(r.read())


def _burst(stack, n: int, concurrency: int = 32) -> list[int]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda i: _complete(stack, i), range(n)))


def test_both_workers_get_connections_and_the_metrics_count_each_request_once(workers_stack):
    before = epp_metric(workers_stack, "inference_objective_request_total")
    # >= 4 connections at once (8 streams each at most), each turned over after 100 streams: >= 10 in
    # all, each handed to a worker at random by the kernel (all on one: < 0.2%)
    statuses = _burst(workers_stack, 600)
    assert statuses.count(200) == 600, {s: statuses.count(s) for s in set(statuses)}
    view = _runtime(workers_stack)
    picks = [w["picks"] for w in view["workers"]]
    assert len(picks) == 2 and all(p > 0 for p in picks), view["workers"]
    assert epp_metric(workers_stack, "inference_objective_request_total") - before == 600
    assert view["in_flight"] == 0 and view["active_streams"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{workers_stack.admin_port}/stats?filter=cluster.llm-epp.upstream_cx_total", timeout=5) as r:
        connections = int(r.read().decode().split(":")[1])
    assert connections >= 6  # one Envoy thread, several connections: the bound on streams, the turnover


def _endpoints(stack) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/endpoints", timeout=5) as r:
        return json.loads(r.read())["endpoints"]


def _scraped_by_workers(stack, pool: int) -> dict:
    """/debug/runtime once the workers' shares of the metrics scraping cover the pool, every endpoint's
    metrics fresh (scraped in the workers, recorded by the parent)."""
    deadline = time.monotonic() + 30
    while True:
        view = _runtime(stack)
        shares = [w["scraping"] for w in view["workers"]]
        eps = _endpoints(stack)
        if sum(shares) == pool and len(eps) == pool and all(e["healthy"] and e["last_scrape_age_s"] < 0.5 for e in eps):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics not scraped by the workers: {view['workers']} {eps}")
        time.sleep(0.1)


def test_the_workers_scrape_the_pools_metrics_and_the_parent_records_them(workers_stack):
    view = _scraped_by_workers(workers_stack, 3)
    assert len(view["workers"]) == 2
    first = {e["address"]: e["last_scrape_age_s"] for e in _endpoints(workers_stack)}
    time.sleep(0.3)
    again = _endpoints(workers_stack)
    assert all(e["last_scrape_age_s"] < 0.3 for e in again), (first, again)  # kept fresh, not a one-off


def test_a_killed_worker_is_started_again_and_the_pool_keeps_no_count_of_its_requests(workers_stack):
    view = _runtime(workers_stack)
    victim = view["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = _runtime(workers_stack)
        pids = {w["pid"] for w in view["workers"]}
        if len(pids) == 2 and victim["pid"] not in pids:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"worker not restarted: {view}")
    assert view["worker_restarts"][victim["worker"]] == 1
    _scraped_by_workers(workers_stack, 3)  # its share of the scraping moved, and came back to it
    statuses = _burst(workers_stack, 100)
    assert statuses.count(200) == 100, {s: statuses.count(s) for s in set(statuses)}
    assert _runtime(workers_stack)["in_flight"] == 0


def test_workers_serve_tls_with_the_one_certificate_envoy_verifies(tmp_path):
    with make_stack(tmp_path, sims=2, epp_workers=2, epp_tls="verified") as stack:
        statuses = _burst(stack, 40, concurrency=8)
        assert statuses.count(200) == 40, {s: statuses.count(s) for s in set(statuses)}
        assert sum(w["picks"] for w in _runtime(stack)["workers"]) == 40


def test_flow_control_queues_the_requests_of_both_workers_in_the_one_parent(tmp_path):
    from tests.integration.test_flowcontrol_gateway import CONFIG, Client, _until, _view

    config = tmp_path / "fc.yaml"
    config.write_text(CONFIG.format(ttl="60s"))
    with make_stack(tmp_path, sims=1, sim_args=("--max-num-seqs", "1"), flow_control_ttl=60.0, epp_workers=2,
                    epp_args=("--config-file", str(config))) as stack:  # fmt: skip
        c = Client(stack)
        c.send("running", max_tokens=300)  # the pool is saturated (one at a time) while it decodes
        _until(lambda: _view(stack, "/debug/runtime")["in_flight"] == 1, "the first request in flight")
        for i in range(3):
            c.send(f"queued-{i}")
        _until(lambda: _view(stack, "/debug/flowcontrol")["requests"] == 3, "three requests queued in the parent")
        c.join()
        assert {name: r[0] for name, r in c.results.items()} == {"running": 200, "queued-0": 200, "queued-1": 200, "queued-2": 200}
        _until(lambda: _view(stack, "/debug/runtime")["in_flight"] == 0, "every request settled")
        assert _view(stack, "/debug/flowcontrol")["requests"] == 0
