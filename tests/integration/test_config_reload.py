"""Config hot reload through the real stack (Envoy -> llm-epp -> simulated vLLM): the config file is
rewritten under a running EPP, the routing changes from round-robin to prefix affinity, and every
request in flight during the swap is answered."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request

import httpx
import pytest

from tests.integration.conftest import MODEL, epp_metric, make_stack

pytestmark = pytest.mark.envoy

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
ROUND_ROBIN = HEADER + "plugins:\n- type: round-robin-picker\nschedulingProfiles:\n- name: spread\n  plugins:\n  - pluginRef: round-robin-picker\n"
PREFIX = HEADER + (
    "plugins:\n- type: prefix-cache-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: affinity\n  plugins:\n"
    "  - pluginRef: prefix-cache-scorer\n  - pluginRef: max-score-picker\n"
)


def _config_state(admin_port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/debug/config", timeout=5) as r:
        return json.loads(r.read())


def _served_by(base_url: str, prompt: str) -> str:
    r = httpx.post(f"{base_url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-served-by"]


def test_a_config_edit_under_load_changes_the_routing_and_drops_no_request(tmp_path):
    config = tmp_path / "epp.yaml"
    config.write_text(ROUND_ROBIN)
    args = ("--config-file", str(config), "--config-reload-interval", "100ms")
    with make_stack(tmp_path, epp_args=args) as s:
        prompt = "the same long system prompt, again and again. " * 40
        before = [_served_by(s.base_url, prompt) for _ in range(6)]
        assert len(set(before)) == 3  # round-robin: the prompt goes everywhere

        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:  # streamed requests that span the swap
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    body = {"model": MODEL, "prompt": "in flight", "max_tokens": 40, "stream": True}
                    with client.stream("POST", f"{s.base_url}/completions", json=body) as r:
                        r.read()
                        statuses.append(r.status_code)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            time.sleep(0.5)
            # written whole and renamed over the file, as editors and ConfigMap updates do: written in
            # place, the 100 ms reloader may read it empty or half-written (an error the count below sees)
            staged = config.with_suffix(".new")
            staged.write_text(PREFIX)
            staged.replace(config)
            digest = hashlib.sha256(PREFIX.encode()).hexdigest()
            deadline = time.monotonic() + 20
            while _config_state(s.epp_admin_port)["config_reload"]["sha256"] != digest:
                assert time.monotonic() < deadline, s.epp_proc.log_path.read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(0.5)  # requests routed by the new config are in flight too
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert len(statuses) >= 8 and set(statuses) == {200}, statuses  # every request during the swap was answered

        state = _config_state(s.epp_admin_port)
        assert [p["name"] for p in state["scheduling"]["profiles"]] == ["affinity"]
        assert state["config_reload"]["last_error"] is None
        after = [_served_by(s.base_url, prompt) for _ in range(6)]
        assert len(set(after[1:])) == 1  # prefix affinity: once seen, the prompt sticks to one endpoint

        # a bad edit: the last good config keeps serving. Written whole and renamed over the file, as editors
        # and ConfigMap updates do, so the 100 ms reloader never reads it half-written (a second error)
        staged = config.with_suffix(".new")
        staged.write_text("plugins: [broken\n")
        staged.replace(config)
        deadline = time.monotonic() + 20
        while not _config_state(s.epp_admin_port)["config_reload"]["last_error"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _served_by(s.base_url, prompt) == after[-1]
        assert epp_metric(s, "llm_epp_config_reloads_total", 'result="success"') == 1
        assert epp_metric(s, "llm_epp_config_reloads_total", 'result="error"') == 1
