"""Flow control through real Envoy on the simulated pool, with the real policies (the loader's
flowControl section): one simulator that runs one sequence at a time (`--max-num-seqs 1`) and a
concurrency-detector with maxConcurrency 1, so every request but the one running waits in the EPP.

- the waiting requests keep their ext_proc streams open (Envoy's timeouts outlast the TTL: `epp up`'s
  `flow_control_ttl`) and are all answered, one at a time;
- a high-priority request sent after low-priority ones is served before them;
- a full band answers 429 `rejected-saturated`; a TTL expiry 429 `rejected-ttl-expired`;
- a client that hangs up while queued leaves no queue entry (/debug/flowcontrol);
- afterwards the queues and the in-flight counts are back at zero.
The in-process version (RequestStream + Director + FlowController) is tests/unit/test_flowcontrol_stream.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

DROPPED = "x-llm-d-request-dropped-reason"

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
- type: concurrency-detector
  name: one-at-a-time
  parameters:
    maxConcurrency: 1
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
flowControl:
  defaultRequestTTL: {ttl}
  saturationDetector:
    pluginRef: one-at-a-time
  defaultPriorityBand:
    maxRequests: 3
  priorityBands:
  - priority: 10
    maxRequests: 10
"""


def _stack(tmp: Path, ttl: str, ttl_s: float):
    config = tmp / "fc.yaml"
    config.write_text(CONFIG.format(ttl=ttl))
    objectives = tmp / "objectives.yaml"
    objectives.write_text("- name: interactive\n  priority: 10\n")
    return make_stack(
        tmp, sims=1, sim_args=("--max-num-seqs", "1"), flow_control_ttl=ttl_s,
        epp_args=("--config-file", str(config), "--objectives", str(objectives)),
    )  # fmt: skip


def _view(stack, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}{path}", timeout=5) as r:
        return json.load(r)


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _queued(stack) -> int:
    return _view(stack, "/debug/flowcontrol")["requests"]


class Client:
    """Requests on threads; each records its status, dropped reason and when it was answered."""

    def __init__(self, stack) -> None:
        self.url = stack.base_url + "/completions"
        self.results: dict[str, tuple[int, str | None, float]] = {}
        self.threads: list[threading.Thread] = []

    def send(self, name: str, *, max_tokens: int = 5, objective: str | None = None, timeout: float = 60.0) -> None:
        def run() -> None:
            headers = {"x-gateway-inference-objective": objective} if objective else {}
            body = {"model": MODEL, "prompt": f"request {name}", "max_tokens": max_tokens}
            try:
                r = httpx.post(self.url, json=body, headers=headers, timeout=timeout)
                self.results[name] = (r.status_code, r.headers.get(DROPPED), time.monotonic())
            except httpx.TimeoutException:
                self.results[name] = (-1, "client-timeout", time.monotonic())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, timeout: float = 60.0) -> None:
        for t in self.threads:
            t.join(timeout)


def test_queued_requests_wait_through_envoy_and_dispatch_in_priority_order(tmp_path):
    with _stack(tmp_path, "60s", 60.0) as stack:
        c = Client(stack)
        c.send("running", max_tokens=300)  # ~2.4 s of decode: the pool is saturated meanwhile
        _until(lambda: _view(stack, "/debug/runtime")["in_flight"] == 1, "the first request in flight")
        for i in range(2):
            c.send(f"low-{i}")
            _until(lambda n=i + 1: _queued(stack) == n, f"low-{i} queued")
        # a client that hangs up while queued: its entry leaves the queue at once
        c.send("gone", timeout=1.0)
        _until(lambda: _queued(stack) == 3, "the impatient client queued")
        _until(lambda: "gone" in c.results, "the impatient client's timeout")
        _until(lambda: _queued(stack) == 2, "the cancelled request to leave the queue")
        c.send("low-2")
        _until(lambda: _queued(stack) == 3, "low-2 queued")
        c.send("over")  # the band holds 3: refused at once
        _until(lambda: "over" in c.results, "the refusal of a full band")
        c.send("high", objective="interactive")
        _until(lambda: _queued(stack) == 4, "the high-priority request queued")
        fc = _view(stack, "/debug/flowcontrol")
        assert [b["priority"] for b in fc["bands"]] == [10, 0] and fc["bands"][0]["requests"] == 1
        c.join()
        r = c.results
        assert r["over"][:2] == (429, "rejected-saturated")
        assert r["gone"][1] == "client-timeout"
        for name in ("running", "low-0", "low-1", "low-2", "high"):
            assert r[name][0] == 200, (name, r[name])
        assert r["high"][2] < min(r[f"low-{i}"][2] for i in range(3)), r  # served first though sent last
        fc = _view(stack, "/debug/flowcontrol")
        outcomes = fc["outcomes"]
        assert fc["requests"] == 0 and fc["bytes"] == 0 and all(b["requests"] == 0 for b in fc["bands"])
        assert outcomes.get("EvictedContextCancelled:0") == 1 and outcomes.get("RejectedCapacity:0") == 1
        assert outcomes.get("Dispatched:0") == 4 and outcomes.get("Dispatched:10") == 1
        _until(lambda: _view(stack, "/debug/runtime")["in_flight"] == 0, "in-flight back to 0")


def test_a_request_past_its_ttl_gets_429_ttl_expired(tmp_path):
    with _stack(tmp_path, "1s", 1.0) as stack:
        c = Client(stack)
        c.send("running", max_tokens=400)  # ~3 s: the queued one's 1 s TTL runs out first
        _until(lambda: _view(stack, "/debug/runtime")["in_flight"] == 1, "the first request in flight")
        c.send("late")
        c.join()
        assert c.results["late"][:2] == (429, "rejected-ttl-expired")
        assert c.results["running"][0] == 200
        fc = _view(stack, "/debug/flowcontrol")
        assert fc["requests"] == 0 and fc["outcomes"].get("EvictedTTL:0") == 1
