"""Real prefill/decode disaggregation: two vLLM CPU servers moving KV with NixlConnector, and the
`pd-sidecar` in front of the decode one.

Run with `pytest -m vllm tests/vllm/test_real_pd.py` after `scripts/vllm-cpu-setup` (which also
installs nixl); skipped otherwise. The module starts two servers side by side (prefill on core 0,
decode on core 1; ~1-2 min), a sidecar process, and for the last test Envoy + the EPP with a P/D
config. Every prompt is new to both servers, so the decode server's prefix cache can only be filled
by the transfer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from extproc.devstack.ports import reserve_port
from extproc.devstack.stack import ROLE_LABEL, LocalStack, StackOptions, _die_with_parent
from tests.vllm.conftest import BLOCK_SIZE, CACHE, MODEL, VllmServer, spawn_vllm, wait_ready

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

NIXL_MARKER = CACHE / "vllm-venv" / ".llm-epp-nixl-1.5.1"
# Both servers produce and consume (kv_both), as llm-d deploys them; CPU buffers, UCX over TCP.
KV_TRANSFER_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}

if not NIXL_MARKER.exists():
    pytestmark.append(pytest.mark.skip(reason=f"nixl is not installed in {CACHE}/vllm-venv: run scripts/vllm-cpu-setup"))


def nixl_env() -> dict[str, str]:
    return {
        "UCX_TLS": "tcp,self,sm",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    }


@dataclass
class PdServers:
    prefill: VllmServer
    decode: VllmServer
    sidecar_url: str
    sidecar_port: int
    sidecar_log: Path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdServers]:
    tmp = tmp_path_factory.mktemp("vllm-pd")
    args = ("--kv-transfer-config", json.dumps(KV_TRANSFER_CONFIG))
    servers: list[VllmServer] = []
    sidecar: subprocess.Popen[bytes] | None = None
    sidecar_port = reserve_port()
    try:
        # each server its own side-channel port
        servers.append(spawn_vllm(tmp / "prefill", core=0, extra_args=args, extra_env=nixl_env(), nixl_side_channel=True))
        servers.append(spawn_vllm(tmp / "decode", core=1, extra_args=args, extra_env=nixl_env(), nixl_side_channel=True))
        for s in servers:
            wait_ready(s)
        prefill, decode = servers
        port = sidecar_port.port
        log_path = tmp / "sidecar.log"
        with open(log_path, "ab") as log:
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "pd_sidecar", "--port", str(port), "--decoder", decode.url],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        yield PdServers(prefill, decode, url, port, log_path)
    finally:
        if sidecar is not None:
            _stop(sidecar)
        for s in servers:
            s.stop()
        sidecar_port.close()


def prompt(case: str) -> str:
    # ~300 tokens: several full 32-token blocks, and far from max-model-len.
    return f"P/D case {case} at {time.time_ns()}: " + "the prompt's KV is computed on one server and read on another. " * 24


def snapshot(s: VllmServer) -> dict[str, float]:
    names = ["vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:external_prefix_cache_hits_total", "vllm:prefix_cache_hits_total"]
    return {n: s.metric(n) for n in names}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("vllm:"): after[k] - before[k] for k in before}


def oa(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def pd_headers(pd: PdServers) -> dict[str, str]:
    return {"x-prefiller-host-port": pd.prefill.address}


def check_legs(pd: PdServers, p0: dict[str, float], d0: dict[str, float], prompt_tokens: int, completion_tokens: int) -> None:
    """The prefill server ran one request of one token over the whole prompt; the decode server ran
    one request whose prompt came (all but at most the last token) from the transfer."""
    p = delta(p0, snapshot(pd.prefill))
    d = delta(d0, snapshot(pd.decode))
    assert p["request_success_total"] == 1 and p["generation_tokens_total"] == 1, p
    assert p["prompt_tokens_total"] == prompt_tokens, p
    assert d["request_success_total"] == 1 and d["generation_tokens_total"] == completion_tokens, d
    assert d["external_prefix_cache_hits_total"] >= prompt_tokens - 1, d
    assert d["prefix_cache_hits_total"] == 0, d  # nothing came from its own cache


def test_completion_through_the_sidecar_uses_the_remote_prefill(pd: PdServers):
    text = prompt("completion")
    p0, d0 = snapshot(pd.prefill), snapshot(pd.decode)
    r = oa(pd.sidecar_url).completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0,
                                              extra_headers=pd_headers(pd))
    assert r.usage is not None and r.usage.completion_tokens == 12
    check_legs(pd, p0, d0, r.usage.prompt_tokens, r.usage.completion_tokens)
    # usage.prompt_tokens_details.cached_tokens stays 0 here: vLLM 0.32 counts only its own cache's
    # hits there, so the transfer shows in vllm:external_prefix_cache_hits_total only (check_legs).
    # The same prompt served locally (no P/D, the prefill server on its own) gives the same tokens.
    local = oa(pd.prefill.url).completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert r.choices[0].text == local.choices[0].text
    with urllib.request.urlopen(f"{pd.sidecar_url}/sidecar/metrics", timeout=5) as m:
        assert 'pd_sidecar_requests_total{path="disaggregated"} 1.0' in m.read().decode()


def test_streaming_completion_through_the_sidecar_uses_the_remote_prefill(pd: PdServers):
    text = prompt("stream")
    p0, d0 = snapshot(pd.prefill), snapshot(pd.decode)
    chunks = list(oa(pd.sidecar_url).completions.create(
        model=MODEL, prompt=text, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers=pd_headers(pd)))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert sum(1 for c in chunks if c.choices) >= 2  # it streamed: several content chunks, one usage chunk
    check_legs(pd, p0, d0, usage.prompt_tokens, usage.completion_tokens)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    local = oa(pd.prefill.url).completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert streamed == local.choices[0].text


def test_chat_through_the_sidecar_uses_the_remote_prefill(pd: PdServers):
    messages = [{"role": "user", "content": prompt("chat")}]
    p0, d0 = snapshot(pd.prefill), snapshot(pd.decode)
    r = oa(pd.sidecar_url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                   extra_headers=pd_headers(pd))  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens >= 1
    check_legs(pd, p0, d0, r.usage.prompt_tokens, r.usage.completion_tokens)
    local = oa(pd.prefill.url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content == local.choices[0].message.content


PD_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 128}
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
"""


def test_envoy_and_the_epp_send_a_long_prompt_through_the_real_pd_path(pd: PdServers, tmp_path: Path):
    (tmp_path / "pd.yaml").write_text(PD_CONFIG)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": [
        {"address": "127.0.0.1", "port": pd.prefill.port, "name": "prefill", "labels": {ROLE_LABEL: "prefill"}},
        {"address": "127.0.0.1", "port": pd.sidecar_port, "name": "decode", "labels": {ROLE_LABEL: "decode"},
         "metricsPort": pd.decode.port},
    ]}))  # fmt: skip
    opts = StackOptions(workdir=tmp_path, endpoints_file=endpoints,
                        epp_args=("--config-file", str(tmp_path / "pd.yaml")))
    stack = LocalStack(opts)  # reads the roles: the prefill server stays out of Envoy's routes
    with stack:
        gw = OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)
        for stream in (False, True):
            text = prompt(f"gateway stream={stream}")
            p0, d0 = snapshot(pd.prefill), snapshot(pd.decode)
            if stream:
                chunks = list(gw.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
                usage, out = chunks[-1].usage, "".join(c.choices[0].text for c in chunks if c.choices)
            else:
                r = gw.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
                usage, out = r.usage, r.choices[0].text
            assert usage is not None
            check_legs(pd, p0, d0, usage.prompt_tokens, usage.completion_tokens)
            local = oa(pd.prefill.url).completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
            assert out == local.choices[0].text
            for _ in range(50):  # Envoy flushes its access log every 100 ms
                if stack.access_log() and len(stack.access_log()) == (2 if stream else 1):
                    break
                time.sleep(0.05)
            assert stack.access_log()[-1]["upstream"] == f"127.0.0.1:{pd.sidecar_port}"
        # A short prompt stays aggregated: the decode server prefills it itself.
        p0 = snapshot(pd.prefill)
        gw.completions.create(model=MODEL, prompt="short one", max_tokens=2, temperature=0)
        assert delta(p0, snapshot(pd.prefill))["request_success_total"] == 0
