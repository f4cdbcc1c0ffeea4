"""P/D with a data-parallel decode pod end to end: real Envoy -> llm-epp (pd-profile-handler with
primaryPort) -> the pod's pd-sidecar on its primary port -> the rank the EPP picked.

One prefill simulator, and one decode pod of RANKS ranks: a simulator per rank, all behind one
`pd-sidecar --data-parallel-size RANKS` whose rank ports are the pod's endpoints (rank, dpGroup,
metricsPort = that rank's simulator). Envoy is sent to the primary port with the picked rank in
x-data-parallel-host-port; the sidecar runs the prefill leg and sends the decode leg to that rank.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.devstack.stack import ROLE_LABEL, LocalStack, PdPool, StackOptions
from tests.integration.conftest import FAST_SIM, MODEL
from tests.integration.test_gateway import log_for

pytestmark = pytest.mark.envoy

RANKS = 3


def config(primary_port: int) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: active-request-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: pd-profile-handler
  parameters:
    deciderPluginName: always-disagg-pd-decider
    primaryPort: {primary_port}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: active-request-scorer}}, {{pluginRef: max-score-picker}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: active-request-scorer}}, {{pluginRef: max-score-picker}}]
"""


class DataParallelDecodeStack(LocalStack):
    """The P/D pool as one prefill simulator and one data-parallel decode pod behind one sidecar."""

    rank_ports: list[int]
    rank_sim_ports: list[int]

    def start_pd_pool(self, pool: PdPool) -> None:
        o = self.opts
        prefill = self._start_sim("prefill-0", 0, o.sim_args)
        self.prefill_endpoints.append(("127.0.0.1", prefill))
        self.rank_sim_ports = [self._start_sim(f"decode-rank-{r}", 1 + r, o.sim_args) for r in range(RANKS)]
        self.rank_ports = [self.reserve_port() for _ in range(RANKS)]
        argv = [sys.executable, "-m", "pd_sidecar", "--host", "127.0.0.1", "--decoder",
                f"http://127.0.0.1:{self.rank_sim_ports[0]}", "--data-parallel-size", str(RANKS),
                "--rank-ports", ",".join(map(str, self.rank_ports)),
                "--decoder-rank-ports", ",".join(map(str, self.rank_sim_ports))]
        proc = self._spawn("sidecar-0", argv, f"http://127.0.0.1:{self.rank_ports[0]}/health", self.rank_ports)
        self._wait_ready(proc)
        self.sidecar_ports = list(self.rank_ports)
        entries: list[dict[str, object]] = [{"address": "127.0.0.1", "port": prefill, "name": "prefill-0",
                                             "labels": {ROLE_LABEL: "prefill"}}]
        for r, (port, sim) in enumerate(zip(self.rank_ports, self.rank_sim_ports, strict=True)):
            entries.append({"address": "127.0.0.1", "port": port, "name": f"decode-0-rank-{r}", "rank": r,
                            "dpGroup": "decode-0", "labels": {ROLE_LABEL: "decode"}, "metricsPort": sim})
        self.endpoints = [("127.0.0.1", int(e["port"])) for e in entries]  # type: ignore[call-overload]
        self.endpoints_path = o.workdir / "endpoints.yaml"
        self.endpoints_path.write_text(yaml.safe_dump({"endpoints": entries}))
        config_path = o.workdir / "pd-dp.yaml"
        config_path.write_text(config(self.rank_ports[0]))
        o.epp_args = (*o.epp_args, "--config-file", str(config_path))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[DataParallelDecodeStack]:
    tmp: Path = tmp_path_factory.mktemp("pd-dp")
    opts = StackOptions(workdir=tmp, sim_args=FAST_SIM, model=MODEL, pd=PdPool())
    with DataParallelDecodeStack(opts) as s:
        yield s


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def sidecar_counter(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sidecar/metrics", timeout=5) as r:
        m = re.search(rf"^{name}\{{{labels}\}} (\S+)$", r.read().decode(), re.M)
    assert m, f"{name}{{{labels}}} not on :{port}"
    return float(m.group(1))


def decision(stack: LocalStack, request_id: str) -> dict:
    decisions = get(f"http://127.0.0.1:{stack.epp_admin_port}/debug/decisions")["decisions"]
    return next(d for d in decisions if d["request_id"] == request_id)


def complete(stack: LocalStack, request_id: str, stream: bool = False) -> httpx.Response:
    body = {"model": MODEL, "prompt": f"[{uuid.uuid4()}] rank me", "max_tokens": 4, "stream": stream}
    return httpx.post(f"{stack.base_url}/completions", json=body, headers={"x-request-id": request_id}, timeout=30)


def send_and_check(stack: DataParallelDecodeStack, stream: bool) -> int:
    """One request through the gateway; asserts the EPP's rank decoded it; returns that rank."""
    request_id = f"pd-dp-{uuid.uuid4()}"
    prefill_before = get(f"http://127.0.0.1:{stack.sim_ports[0]}/sim/stats")["prefill_legs_total"]
    header_before = sidecar_counter(stack.rank_ports[0], "pd_sidecar_data_parallel_header_total", 'outcome="routed"')
    r = complete(stack, request_id, stream)
    assert r.status_code == 200, r.text
    picked = decision(stack, request_id)["chosen"][0]  # the rank endpoint, not the primary port
    rank = [f"127.0.0.1:{p}" for p in stack.rank_ports].index(picked)
    assert r.headers["x-served-by"] == f"127.0.0.1:{stack.rank_sim_ports[rank]}"
    log = log_for(stack, request_id)
    assert log["upstream"] == f"127.0.0.1:{stack.rank_ports[0]}"  # Envoy went to the primary port
    assert get(f"http://127.0.0.1:{stack.sim_ports[0]}/sim/stats")["prefill_legs_total"] == prefill_before + 1
    assert sidecar_counter(stack.rank_ports[0], "pd_sidecar_data_parallel_header_total",
                           'outcome="routed"') == header_before + 1
    return rank


@pytest.mark.parametrize("stream", [False, True])
def test_the_rank_the_epp_picked_decodes_after_a_remote_prefill(stack, stream):
    # Idle ranks tie and the picker breaks ties at random: go on until a rank other than the primary's
    # own has served (a sidecar that ignored the header would fail there).
    ranks = {send_and_check(stack, stream)}
    for _ in range(40):
        if ranks - {0}:
            break
        ranks.add(send_and_check(stack, stream))
    assert ranks - {0}


def test_each_ranks_port_counts_the_requests_its_rank_served(stack):
    for i in range(4):
        assert complete(stack, f"pd-dp-count-{i}-{uuid.uuid4()}").status_code == 200
    served = [get(f"http://127.0.0.1:{p}/sim/stats")["decode_legs_total"] for p in stack.rank_sim_ports]
    counted = [sidecar_counter(p, "pd_sidecar_requests_total", 'path="disaggregated"') for p in stack.rank_ports]
    assert sum(served) >= 4 and counted == served
