"""The real-vLLM tier: Envoy -> EPP -> real vLLM CPU servers with the tiny model.

Run with `pytest -m vllm` after `scripts/vllm-cpu-setup`; skipped otherwise. One server is shared
by the module (~50-130 s to start); the routing test starts a second one.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import KV_EVENTS_PORT_LABEL, KVEventSubscriber
from extproc.datalayer.scraper import MetricsScraper, parse_vllm_metrics
from extproc.devstack.stack import LocalStack, StackOptions
from pickers.framework.endpoint import EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys
from pickers.indexes.tokenization import HFTokenizer
from tests.vllm.conftest import BLOCK_SIZE, MODEL, MODEL_DIR, VllmServer, start_vllm, write_endpoints

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def gateway(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("vllm-gw")
    endpoints = write_endpoints(tmp / "endpoints.yaml", [vllm_server])
    with LocalStack(StackOptions(workdir=tmp, endpoints_file=endpoints, epp_args=("--strategy", "default"))) as s:
        yield s


def client(stack: LocalStack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def test_completions_through_envoy_and_the_epp(gateway: LocalStack):
    r = client(gateway).completions.create(model=MODEL, prompt="Hello there, routing", max_tokens=5)
    assert r.usage is not None and r.usage.completion_tokens >= 1 and r.choices[0].text is not None


def test_streaming_completions_through_envoy_and_the_epp(gateway: LocalStack):
    chunks = list(client(gateway).completions.create(
        model=MODEL, prompt="Hello again", max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_through_envoy_and_the_epp(gateway: LocalStack):
    r = client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.choices[0].message.role == "assistant" and r.usage is not None


def test_streaming_chat_through_envoy_and_the_epp(gateway: LocalStack):
    chunks = list(client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    log = gateway.access_log()
    assert log and log[-1]["upstream"] == log[-1]["destination"]


def test_the_scraper_parses_real_metrics(vllm_server: VllmServer):
    m = parse_vllm_metrics(vllm_server.metrics_text())
    assert m.block_size == BLOCK_SIZE and m.num_gpu_blocks and m.num_gpu_blocks >= 64
    assert 0.0 <= m.kv_usage <= 1.0 and m.waiting >= 0 and m.running >= 0


def test_the_series_filter_asks_real_vllm_for_only_what_the_scraper_reads(vllm_server: VllmServer):
    """metrics-data-source's seriesFilter (on by default): vLLM serves `/metrics/` with prometheus_client,
    which honours `name[]` (its exact `/metrics` does not); the page is a fraction of the whole one and
    reads the same."""
    ds = Datastore()
    ds.set_endpoints([EndpointSpec(name="real", host="127.0.0.1", port=vllm_server.port)])
    ep = ds.candidates()[0]
    scraper = MetricsScraper(ds)
    url = scraper.url(ep)
    assert url.startswith(f"http://127.0.0.1:{vllm_server.port}/metrics/?name%5B%5D=")
    with urllib.request.urlopen(url, timeout=10) as r:
        filtered = r.read().decode()
    whole = vllm_server.metrics_text()
    served = {line.split("{")[0].split(" ")[0] for line in filtered.splitlines() if line and not line.startswith("#")}
    parser = scraper.parser_for(ep)
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"} <= served
    assert served <= set(parser.names), sorted(served - set(parser.names))
    assert len(filtered) * 5 < len(whole), (len(filtered), len(whole))
    assert parser.parse(filtered) == parser.parse(whole)  # an idle server: the same values


async def test_real_events_are_decoded_and_indexed(vllm_server: VllmServer):
    index = KVBlockIndex()
    ds = Datastore()
    sub = KVEventSubscriber(ds, index, default_port=None)
    task = asyncio.create_task(sub.run())
    ds.set_endpoints([EndpointSpec("v", "127.0.0.1", vllm_server.port, labels={KV_EVENTS_PORT_LABEL: str(vllm_server.kv_port)})])
    try:
        await asyncio.sleep(1.0)
        prompt = "Indexing test: " + "events carry the token ids of every stored block. " * 12
        oa = OpenAI(base_url=f"{vllm_server.url}/v1", api_key="unused", max_retries=0)
        await asyncio.to_thread(oa.completions.create, model=MODEL, prompt=prompt, max_tokens=1)
        tokens = HFTokenizer(MODEL_DIR).encode(prompt, add_special_tokens=True)
        keys = request_keys(tokens, BLOCK_SIZE, 256)
        for _ in range(100):
            if index.match(keys):
                break
            await asyncio.sleep(0.05)
        assert index.match(keys) == {vllm_server.address: len(tokens) // BLOCK_SIZE}
        assert sub.messages >= 1 and sub.gaps == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


PRECISE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {{tokenizer: "{model}", kvEventsPort: 0}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


@pytest.mark.slow
def test_requests_go_to_the_real_server_that_holds_their_prefix(vllm_server: VllmServer, tmp_path: Path):
    """Two real servers; each one's cache is filled directly (the EPP never saw those requests);
    requests through the gateway then hit the holder's prefix cache, as its hit counter shows."""
    second = start_vllm(tmp_path / "second", core=1)
    try:
        servers = [vllm_server, second]
        (tmp_path / "precise.yaml").write_text(PRECISE.format(model=MODEL_DIR))
        endpoints = write_endpoints(tmp_path / "endpoints.yaml", servers)
        opts = StackOptions(workdir=tmp_path, endpoints_file=endpoints, epp_args=("--config-file", str(tmp_path / "precise.yaml")))
        with LocalStack(opts) as stack:
            time.sleep(1.0)  # the EPP's SUB sockets connect
            gw = client(stack)
            for i, holder in enumerate(servers * 2):
                prefix = f"Routing case {i}: " + f"a document only server {holder.port} has read. " * 12
                OpenAI(base_url=f"{holder.url}/v1", api_key="unused").completions.create(model=MODEL, prompt=prefix + "warm", max_tokens=1)
                time.sleep(0.5)  # the events reach the EPP
                hits_before = [s.metric("vllm:prefix_cache_hits_total") for s in servers]
                r = gw.completions.create(model=MODEL, prompt=prefix + "question", max_tokens=1)
                hits_after = [s.metric("vllm:prefix_cache_hits_total") for s in servers]
                gained = [a - b for a, b in zip(hits_after, hits_before)]
                other = servers[1 - servers.index(holder)]
                assert gained[servers.index(holder)] >= BLOCK_SIZE and gained[servers.index(other)] == 0, gained
                details = r.usage.prompt_tokens_details if r.usage else None
                assert details is not None and (details.cached_tokens or 0) >= BLOCK_SIZE
                for _ in range(50):  # Envoy flushes its access log every 100 ms
                    if len(stack.access_log()) == i + 1:
                        break
                    time.sleep(0.05)
                assert stack.access_log()[-1]["upstream"] == holder.address
    finally:
        second.stop()
