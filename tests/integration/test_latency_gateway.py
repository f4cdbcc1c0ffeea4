"""The latency model through real Envoy: llm-d's predicted-latency plugins serve (the admitter lets
non-sheddable requests through), each response carries the prediction under --explain-scores, the
decisions show every candidate's predicted TTFT, and the model learns each endpoint from the
responses (`/debug/endpoints`). The admitter's 500 is tested through the Director (unit tests)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.latency_model import AGGREGATED
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

CONFIG = AGGREGATED.replace("- type: latency-scorer\n", "- type: latency-scorer\n- type: latency-slo-admitter\n")


def chat(base: str, content: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    req = urllib.request.Request(f"{base}/chat/completions", data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_predictions_ride_on_responses_and_the_model_learns_each_endpoint(tmp_path: Path):
    cfg = tmp_path / "epp.yaml"
    cfg.write_text(CONFIG)
    with make_stack(tmp_path, sims=2, sim_args=("--time-scale", "0.2"), epp_args=("--config-file", str(cfg), "--explain-scores")) as s:
        for i in range(24):
            status, headers, _ = chat(s.base_url, f"[{i}] " + "word " * (50 + 40 * i))
            assert status == 200
            assert float(headers["x-llm-epp-predicted-ttft-ms"]) > 0 and float(headers["x-llm-epp-predicted-tpot-ms"]) > 0
        deadline = time.monotonic() + 5
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.epp_admin_port}/debug/endpoints", timeout=5) as r:
                eps = json.loads(r.read())["endpoints"]
            if sum(e["latency"]["samples"] for e in eps) == 24 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sum(e["latency"]["samples"] for e in eps) == 24
        assert sum(e["latency"]["tpot_samples"] for e in eps) == 24
        learned = [e["latency"] for e in eps if e["latency"]["samples"] >= 8]
        assert learned and all(lat["source"] == "own" and lat["prefill_tokens_per_s"] != 15928.0 for lat in learned)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.epp_admin_port}/debug/decisions?limit=1", timeout=5) as r:
            (decision,) = json.loads(r.read())["decisions"]
        assert set(decision["scores"]["predicted-latency-producer/ttft_ms"]) == {e["address"] for e in eps}
