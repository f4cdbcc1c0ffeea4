"""Precise prefix-cache routing through the whole path (Envoy -> EPP -> simulators) with the
simulators publishing KV events: the EPP routes to the server whose cache really holds the prompt,
even when the cache was filled behind its back."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from extproc.devstack.stack import LocalStack
from tests.integration.conftest import MODEL, make_stack

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {tokenizer: sim, kvEventsPort: 0}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""
# The same routing in llm-d's shape: the request's tokens from a token-producer (the simulator's
# tokenizer, locally), the KV-event index in a precise-prefix-cache-producer, scored by the generic
# prefix-cache-scorer that names it (each simulator's port label overrides socketPort).
PRODUCER_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {local: {tokenizer: sim}}
- type: precise-prefix-cache-producer
  parameters:
    kvEventsConfig: {topicFilter: "kv@"}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""


@pytest.fixture(scope="module", params=["scorer", "producer"])
def precise_stack(tmp_path_factory, request) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("precise")
    (tmp / "precise.yaml").write_text(CONFIG if request.param == "scorer" else PRODUCER_CONFIG)
    with make_stack(tmp, sims=3, kv_events=True, epp_args=("--config-file", str(tmp / "precise.yaml"))) as s:
        time.sleep(0.5)  # the EPP's SUB sockets connect
        yield s


def post(url: str, body: dict) -> tuple[dict, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read()), r.headers.get("x-served-by", "")


@pytest.mark.parametrize("target", [0, 1, 2])
def test_routes_to_the_server_whose_cache_was_filled_behind_the_epps_back(precise_stack: LocalStack, target: int):
    host, port = precise_stack.endpoints[target]
    prefix = f"target {target}: " + "a long shared document that fills many cache blocks. " * 20
    post(f"http://{host}:{port}/v1/completions", {"model": MODEL, "prompt": prefix + "warm", "max_tokens": 1})
    time.sleep(0.3)  # events travel to the EPP
    for question in ("one?", "two?", "three?"):
        _, served = post(f"{precise_stack.base_url}/completions",
                         {"model": MODEL, "prompt": prefix + question, "max_tokens": 1})
        assert served == f"{host}:{port}"


def test_chat_requests_are_matched_through_the_chat_template(precise_stack: LocalStack):
    host, port = precise_stack.endpoints[1]
    system = {"role": "system", "content": "You answer about caches. " * 30}
    post(f"http://{host}:{port}/v1/chat/completions",
         {"model": MODEL, "messages": [system, {"role": "user", "content": "warm"}], "max_tokens": 1})
    time.sleep(0.3)
    _, served = post(f"{precise_stack.base_url}/chat/completions",
                     {"model": MODEL, "messages": [system, {"role": "user", "content": "and now?"}], "max_tokens": 1})
    assert served == f"{host}:{port}"


def test_a_reset_cache_no_longer_attracts_requests(precise_stack: LocalStack):
    (host, port), (h2, p2) = precise_stack.endpoints[0], precise_stack.endpoints[2]
    prefix = "reset test: " + "words that only these requests use. " * 25
    post(f"http://{host}:{port}/v1/completions", {"model": MODEL, "prompt": prefix + "x", "max_tokens": 1})
    time.sleep(0.3)
    assert post(f"{precise_stack.base_url}/completions", {"model": MODEL, "prompt": prefix + "y", "max_tokens": 1})[1] == f"{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/sim/reset", b"", method="POST"), timeout=5)
    post(f"http://{h2}:{p2}/v1/completions", {"model": MODEL, "prompt": prefix + "z", "max_tokens": 1})
    time.sleep(0.3)
    assert post(f"{precise_stack.base_url}/completions", {"model": MODEL, "prompt": prefix + "w", "max_tokens": 1})[1] == f"{h2}:{p2}"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_index_size_is_exported_and_a_restarted_server_leaves_the_index_at_once(precise_stack: LocalStack):
    """Runs last: it restarts a simulator. The EPP's precise index drops the server's entries when
    its connection drops (or its scrape fails), before the restarted server publishes anything."""
    from bench.precise import _respawn_sim

    host, port = precise_stack.endpoints[2]
    address = f"{host}:{port}"
    post(f"http://{host}:{port}/v1/completions",
         {"model": MODEL, "prompt": "restart test: " + "blocks the restart must forget. " * 25, "max_tokens": 1})
    admin = f"http://127.0.0.1:{precise_stack.epp_admin_port}/debug/endpoints"
    metrics = f"http://127.0.0.1:{precise_stack.epp_metrics_port}/metrics"

    def blocks() -> dict[str, int]:
        # one precise index either way: the scorer's or the producer's
        return {e["address"]: next(iter(e["precise_prefix_blocks"].values())) for e in get_json(admin)["endpoints"]}

    def exported() -> str:
        with urllib.request.urlopen(metrics, timeout=10) as r:
            return r.read().decode()

    deadline = time.monotonic() + 3
    while blocks()[address] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    held = blocks()
    assert held[address] > 0
    size = next(line for line in exported().splitlines() if line.startswith("inference_extension_precise_prefix_indexer_size{"))
    assert float(size.rsplit(" ", 1)[1]) == sum(held.values())
    _respawn_sim(precise_stack, 2)  # SIGKILL, then the same argv: same ports, empty cache
    deadline = time.monotonic() + 5
    while blocks()[address] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert blocks()[address] == 0  # no request reached it since: no event told this, the reset did
    assert "inference_extension_precise_prefix_indexer_resets_total{" in exported()
