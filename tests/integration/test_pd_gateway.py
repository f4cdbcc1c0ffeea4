"""Prefill/decode disaggregation end to end: real Envoy -> llm-epp (pickers/configs/pd.yaml) -> pd-sidecar
-> simulated prefill and decode servers. The simulators count the legs they served (/sim/stats), so each
test sees which path a request took; the client must always get one ordinary response."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from extproc.devstack.stack import LocalStack, PdPool
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

PD_CONFIG = Path(__file__).resolve().parents[2] / "pickers" / "configs" / "pd.yaml"


def pd_stack(tmp: Path, prefill: int, decode: int, *epp_args: str) -> LocalStack:
    return make_stack(tmp, pd=PdPool(prefill=prefill, decode=decode), epp_args=("--config-file", str(PD_CONFIG), *epp_args))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    """1 prefill simulator, 2 decode simulators each behind a sidecar."""
    with pd_stack(tmp_path_factory.mktemp("pd"), 1, 2) as s:
        yield s


def long_prompt() -> str:
    """~1,100 tokens nobody has seen: well over pd.yaml's nonCachedTokens (512)."""
    return f"[{uuid.uuid4()}] " + "Summarise the quarterly report on shipping delays. " * 85


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
        return json.load(r)


def legs(stack: LocalStack) -> tuple[int, int]:
    """(prefill legs served by the prefill simulators, decode legs served by the decode simulators)."""
    n = len(stack.prefill_endpoints)
    prefill = sum(stats(p)["prefill_legs_total"] for p in stack.sim_ports[:n])
    decode = sum(stats(p)["decode_legs_total"] for p in stack.sim_ports[n:])
    return prefill, decode


def sidecar_paths(stack: LocalStack) -> dict[str, float]:
    """pd_sidecar_requests_total by path, summed over the sidecars."""
    out: dict[str, float] = {}
    for port in stack.sidecar_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for m in re.finditer(r'^pd_sidecar_requests_total\{path="(\w+)"\} (\S+)$', r.read().decode(), re.M):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def decode_sims(stack: LocalStack) -> set[str]:
    return {f"127.0.0.1:{p}" for p in stack.sim_ports[len(stack.prefill_endpoints):]}


def client(stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)


def test_long_uncached_prompt_takes_the_pd_path(stack):
    before = legs(stack)
    raw = client(stack).completions.with_raw_response.create(model=MODEL, prompt=long_prompt(), max_tokens=6)
    completion = raw.parse()
    assert len(completion.choices) == 1 and completion.usage.completion_tokens == 6
    assert raw.headers["x-served-by"] in decode_sims(stack)
    # the decode leg pulled the prompt's KV instead of computing it
    assert completion.usage.prompt_tokens_details.cached_tokens == completion.usage.prompt_tokens
    assert legs(stack) == (before[0] + 1, before[1] + 1)


def test_long_uncached_streaming_chat_takes_the_pd_path(stack):
    before = legs(stack)
    chunks = list(
        client(stack).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": long_prompt()}],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 7
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert legs(stack) == (before[0] + 1, before[1] + 1)


def test_short_prompt_skips_prefill(stack):
    before, paths = legs(stack), sidecar_paths(stack)
    completion = client(stack).completions.create(model=MODEL, prompt="Say hello", max_tokens=3)
    assert completion.usage.completion_tokens == 3
    assert legs(stack) == before
    assert sidecar_paths(stack)["proxy"] == paths["proxy"] + 1


def test_cached_prompt_skips_prefill(stack):
    prompt = long_prompt()
    first = client(stack).completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=2)
    after_first = legs(stack)
    second = client(stack).completions.with_raw_response.create(model=MODEL, prompt=prompt + " And the outlook?", max_tokens=2)
    assert legs(stack) == after_first  # the decode endpoint holds the prompt: it prefills the rest itself
    assert second.headers["x-served-by"] == first.headers["x-served-by"]
    assert second.parse().usage.prompt_tokens_details.cached_tokens > 0


def test_client_sent_prefiller_header_never_reaches_a_sidecar(stack):
    prefill_sim = f"127.0.0.1:{stack.sim_ports[0]}"
    before, paths = legs(stack), sidecar_paths(stack)
    # short prompt: the EPP sets no header, so the client's must be removed, not obeyed
    r = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": "Say hello", "max_tokens": 2},
        headers={"x-prefiller-host-port": prefill_sim},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert legs(stack) == before
    assert sidecar_paths(stack)["proxy"] == paths["proxy"] + 1
    # long prompt: the EPP's choice replaces the client's (a dead port would mean a fallback)
    r = httpx.post(
        f"{stack.base_url}/completions",
        json={"model": MODEL, "prompt": long_prompt(), "max_tokens": 2},
        headers={"x-prefiller-host-port": "127.0.0.1:1"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert legs(stack) == (before[0] + 1, before[1] + 1)
    assert sidecar_paths(stack).get("fallback", 0) == paths.get("fallback", 0)


def test_dead_prefill_endpoint_degrades_to_aggregated_serving(tmp_path):
    with pd_stack(tmp_path, 1, 1, "--metrics-staleness-threshold", "0.5s") as s:
        prefill = next(p for p in s.procs if p.name == "prefill-0")
        prefill.stop()
        paths_before = sidecar_paths(s)
        # at once: the EPP may still pick the dead prefill server; the sidecar then prefills locally
        for _ in range(3):
            completion = client(s).completions.create(model=MODEL, prompt=long_prompt(), max_tokens=3)
            assert completion.usage.completion_tokens == 3
        # once its metrics are stale the EPP stops picking it: plain aggregated requests, no header
        time.sleep(1.5)
        paths = sidecar_paths(s)
        for _ in range(3):
            completion = client(s).completions.create(model=MODEL, prompt=long_prompt(), max_tokens=3)
            assert completion.usage.completion_tokens == 3
        after = sidecar_paths(s)
        assert after["proxy"] == paths["proxy"] + 3
        assert after["disaggregated"] == paths_before["disaggregated"]
