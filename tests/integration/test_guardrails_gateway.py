"""Guardrails and the audit trail through the real stack (Envoy + EPP + simulators), as docs/guardrails.md
describes them:

- each admission rule (request-limits-admitter, content-check-admitter) refuses what it should with its
  status, message and dropped reason, and lets the rest through; a flagging rule only flags;
- the decisions show in /debug/decisions and in the metrics;
- the audit file holds one record per request, with the fields the client saw, under 1,000 concurrent
  requests;
- an audit sink that stops reading (a named pipe nobody drains) loses records, counted, and no request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from bench.http1 import Parser, request_bytes
from tests.integration.conftest import MODEL, epp_metric, make_stack
from tests.integration.test_load import _raise_fd_limit

pytestmark = pytest.mark.envoy

DROPPED = "x-llm-d-request-dropped-reason"
AWS_KEY = "AKIAABCDEFGHIJKLMNOP"

CONFIG = f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: request-limits-admitter
  name: limits
  parameters:
    rules:
    - name: free-tier
      objectives: [free]
      maxPromptTokens: 50
      maxOutputTokens: 64
    - name: catalogue
      allowedModels: [{MODEL}]
      allowedPaths: [/v1/completions, /v1/chat/completions]
- type: content-check-admitter
  name: content
  parameters:
    rules:
    - name: aws-key
      preset: aws-access-key-id
    - name: card
      preset: card-number
      status: 400
    - name: codename
      pattern: '(?i)project\\s+bluebird'
      action: flag
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


def _stack(tmp: Path, *audit_args: str, **kw):
    config = tmp / "guardrails.yaml"
    config.write_text(CONFIG)
    objectives = tmp / "objectives.yaml"
    objectives.write_text("- name: free\n  priority: 0\n")
    args = ("--config-file", str(config), "--objectives", str(objectives), "--audit-client-header", "x-user-id", *audit_args)
    return make_stack(tmp, epp_args=args, **kw)


def _audit(path: Path, want: int, timeout: float = 20.0) -> list[dict]:
    """The audit file's records once it holds `want` of them (the writer flushes every 0.1 s); a line
    the writer is still writing (no newline yet) is not one."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        if len(lines) >= want or time.monotonic() > deadline:
            return [json.loads(x) for x in lines]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guardrails")
    audit = tmp / "audit.jsonl"
    with _stack(tmp, "--audit-sink", "file", "--audit-file", str(audit)) as stack:
        yield stack, audit


# (name, path, body, headers, status, dropped reason, what the body says)
CASES = [
    ("ok", "/completions", {"prompt": "hello there", "max_tokens": 5}, {}, 200, None, None),
    ("long-prompt", "/completions", {"prompt": "word " * 60, "max_tokens": 5}, {"x-gateway-inference-objective": "free"},
     400, "rejected-request-limits", "rule 'free-tier' (maxPromptTokens)"),
    ("many-tokens", "/completions", {"prompt": "hi", "max_tokens": 65}, {"x-gateway-inference-objective": "free"},
     400, "rejected-request-limits", "rule 'free-tier' (maxOutputTokens): max_tokens 65 is over the 64 allowed"),
    ("free-ok", "/completions", {"prompt": "hi", "max_tokens": 64}, {"x-gateway-inference-objective": "free"}, 200, None, None),
    ("other-model", "/completions", {"model": "gpt-x", "prompt": "hi", "max_tokens": 5}, {},
     403, "rejected-request-limits", "rule 'catalogue' (allowedModels): model 'gpt-x' is not allowed"),
    ("embeddings", "/embeddings", {"input": "hi"}, {}, 403, "rejected-request-limits", "rule 'catalogue' (allowedPaths)"),
    ("chat-ok", "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, {}, 200, None, None),
    ("aws-key", "/chat/completions", {"messages": [{"role": "user", "content": f"use {AWS_KEY} please"}], "max_tokens": 5}, {},
     403, "rejected-content-check", "content-check-admitter 'content' rule 'aws-key'"),
    ("card", "/completions", {"prompt": "charge 4111 1111 1111 1111", "max_tokens": 5}, {},
     400, "rejected-content-check", "rule 'card'"),
    ("not-a-card", "/completions", {"prompt": "order 4111 1111 1111 1112", "max_tokens": 5}, {}, 200, None, None),
    ("flagged", "/completions", {"prompt": "status of Project Bluebird?", "max_tokens": 5}, {}, 200, None, None),
]  # fmt: skip


def test_each_rule_refuses_what_it_should_and_lets_the_rest_through(guarded):
    stack, audit = guarded
    answers = {}
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        for name, path, body, headers, status, reason, says in CASES:
            r = client.post(path, json={"model": MODEL, **body}, headers={"x-request-id": f"case-{name}", "x-user-id": "u-7", **headers})
            answers[name] = r
            assert r.status_code == status, (name, r.status_code, r.text)
            assert r.headers.get(DROPPED) == reason, name
            if says is not None:
                assert r.text.startswith("inference error: ") and says in r.text, (name, r.text)
                assert AWS_KEY not in r.text and "4111" not in r.text  # the message never repeats the match
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/decisions", timeout=5) as resp:
        decisions = {d["request_id"]: d for d in json.load(resp)["decisions"]}
    assert decisions["case-aws-key"]["rules"] == ["content/aws-key"] and decisions["case-aws-key"]["error"] == "Forbidden"
    assert decisions["case-flagged"]["rules"] == ["content/codename"] and decisions["case-flagged"]["chosen"]
    assert decisions["case-ok"]["rules"] == [] and decisions["case-ok"]["error"] is None
    refused = "llm_epp_admission_decisions_total"
    assert epp_metric(stack, refused, 'decision="refused",plugin_name="content",rule="aws-key"') == 1
    assert epp_metric(stack, refused, 'decision="refused",plugin_name="limits",rule="free-tier"') == 2
    assert epp_metric(stack, refused, 'decision="flagged",plugin_name="content",rule="codename"') == 1

    records = {r["request_id"]: r for r in _audit(audit, len(CASES)) if r["request_id"].startswith("case-")}
    assert len(records) == len(CASES)
    for name, path, _, headers, status, reason, _ in CASES:
        rec = records[f"case-{name}"]
        assert rec["status"] == status and rec["dropped_reason"] == reason and rec["client"] == "u-7", rec
        assert rec["path"] == "/v1" + path and rec["objective"] == headers.get("x-gateway-inference-objective", "")
        assert rec["admission"] == ("refused" if reason else "flagged" if name == "flagged" else "passed")
        assert bool(rec["endpoints"]) == (status == 200)
        if status == 200:
            assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0 and rec["duration_ms"] > 0
    assert records["case-flagged"]["rules"] == ["content/codename"]
    assert records["case-other-model"]["model"] == "gpt-x"


async def _one(port: int, request_id: str, prompt: str, user: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 3}).encode()
        writer.write(request_bytes("POST", "/v1/completions", "gw", body, {
            "Content-Type": "application/json", "x-request-id": request_id, "x-user-id": user, "Connection": "close",
        }))  # fmt: skip
        parser = Parser()
        while True:
            data = await asyncio.wait_for(reader.read(65536), 60)
            if not data:
                raise ConnectionError("closed before the response")
            msgs = parser.feed(data)
            if msgs:
                return msgs[0].status
    finally:
        writer.close()


async def _burst(port: int, n: int) -> dict[str, int]:
    """`n` requests at once, one connection each; every 10th carries a secret and is refused."""
    ids = [f"burst-{i}" for i in range(n)]
    prompts = [f"key {AWS_KEY}" if i % 10 == 0 else f"prompt {i}" for i in range(n)]
    statuses = await asyncio.gather(*(_one(port, rid, p, f"user-{i % 7}") for i, (rid, p) in enumerate(zip(ids, prompts))))
    return dict(zip(ids, statuses))


def test_audit_records_match_1000_concurrent_requests_one_to_one(guarded):
    stack, audit = guarded
    _raise_fd_limit(4096)
    n = 1000
    statuses = asyncio.run(_burst(stack.listen_port, n))
    assert sum(s == 403 for s in statuses.values()) == n // 10
    assert sum(s == 200 for s in statuses.values()) == n - n // 10, statuses
    before = sum(1 for r in _audit(audit, 0) if not r["request_id"].startswith("burst-"))
    records = [r for r in _audit(audit, before + n) if r["request_id"].startswith("burst-")]
    assert len(records) == n  # one each: no record lost, none twice
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == set(statuses)
    for rid, status in statuses.items():
        rec = by_id[rid]
        i = int(rid.split("-")[1])
        assert rec["status"] == status and rec["client"] == f"user-{i % 7}"
        assert rec["admission"] == ("refused" if i % 10 == 0 else "passed")
        assert (rec["rules"] == ["content/aws-key"]) == (i % 10 == 0)
        assert bool(rec["endpoints"]) == (status == 200)
    assert epp_metric(stack, "llm_epp_audit_records_total", 'result="dropped"') == 0
    assert epp_metric(stack, "llm_epp_audit_records_total", 'result="failed"') == 0


def test_a_sink_that_stops_reading_loses_records_counted_and_no_request(tmp_path):
    fifo = tmp_path / "audit.pipe"
    os.mkfifo(fifo)
    # a reader that never reads: the EPP's writes fill the pipe (64 KiB) and then block its writer thread
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with _stack(tmp_path, "--audit-sink", "file", "--audit-file", str(fifo), "--audit-queue-size", "20", sims=1) as stack:
            n = 400
            statuses = asyncio.run(_burst(stack.listen_port, n))
            assert sum(s == 200 for s in statuses.values()) == n - n // 10 and sum(s == 403 for s in statuses.values()) == n // 10
            dropped = epp_metric(stack, "llm_epp_audit_records_total", 'result="dropped"')
            written = epp_metric(stack, "llm_epp_audit_records_total", 'result="written"')
            assert dropped > 0 and written + dropped <= n  # the rest wait in the queue or the blocked write
            # the collector catches up: what was written reads back whole, one JSON record a line
            data = b""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(reader, 1 << 20)
                except BlockingIOError:
                    chunk = b""
                data += chunk
                if not chunk:
                    written = epp_metric(stack, "llm_epp_audit_records_total", 'result="written"')
                    if written + dropped >= n and data.count(b"\n") >= written:
                        break
                    time.sleep(0.05)
            lines = data.splitlines()
            assert len(lines) == written and written + dropped == n
            assert all(json.loads(x)["request_id"].startswith("burst-") for x in lines)
    finally:
        os.close(reader)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_response_is_audited_as_the_sha256_of_the_body_the_client_got(tmp_path, workers):
    audit = tmp_path / "audit.jsonl"
    args = ("--audit-sink", "file", "--audit-file", str(audit), "--audit-response", "hash")
    with _stack(tmp_path, *args, sims=1, epp_workers=workers) as stack:
        bodies = {}
        for i, stream in enumerate((False, True, False)):
            body = {"model": MODEL, "prompt": f"tell me {i}", "max_tokens": 8, "stream": stream}
            r = httpx.post(f"{stack.base_url}/completions", json=body, headers={"x-request-id": f"resp-{i}"}, timeout=30)
            assert r.status_code == 200
            bodies[f"resp-{i}"] = r.content
        records = {r["request_id"]: r for r in _audit(audit, 3)}
    for rid, content in bodies.items():
        assert records[rid]["response_sha256"] == hashlib.sha256(content).hexdigest(), rid  # streamed or not
        assert records[rid]["response_excerpt"] is None and records[rid]["prompt_sha256"] is None
