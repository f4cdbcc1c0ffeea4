"""Real vLLM with data parallelism, as far as vLLM 0.32 runs it on CPU.

What runs: `--data-parallel-size 2` with internal load balancing and the tiny (dense) model: one API
port over two engines, which vLLM runs as independent replicas (dense models do not step in
lockstep). That is enough to pin what the EPP and the simulator rely on: `/metrics` has a series per
engine labelled `engine="<rank>"`, and rank r publishes its KV events on the configured port + r with
its rank in the payload, so the EPP's per-rank subscriptions (one socket per rank) attribute each
rank's blocks to that rank.

What does not run on CPU, and why no test serves rank endpoints from real vLLM (the wide-EP layout):
- one API server per rank (`--data-parallel-rank`, `--data-parallel-external-lb`, or the DP
  supervisor `--data-parallel-multi-port-external-lb`) is refused for dense models: "Non-MoE models
  do not support external data parallel mode. For external load balancing, launch independent vLLM
  instances without --data-parallel-* arguments." (vllm/engine/arg_utils.py);
- with a MoE model (a tiny random MixtralForCausalLM, 4 experts, top-2) the DP group starts (with or
  without --enable-expert-parallel; the supervisor then serves each rank on its own port with its
  own `engine` label) but the first forward step fails on every rank: the MoE token exchange on CPU
  (AgRsAll2AllManager, the only all2all CPU supports) calls `all_gatherv`, which CpuCommunicator does
  not implement (base_device_communicator.py: NotImplementedError), so the request gets a 500.
The wide-EP manifests' vLLM commands are still checked against vLLM's own code here (first test).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml
import zmq
from openai import OpenAI

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.kv_events import KV_EVENTS_PORT_LABEL, KVEventSubscriber
from pickers.framework.endpoint import EndpointSpec
from pickers.indexes.kv_blocks import KVBlockIndex, request_keys
from pickers.indexes.tokenization import HFTokenizer
from tests.k8s.kustomize import named, needs_kubectl, render
from tests.k8s.test_wide_ep_manifests import GROUPS, ROOT, WIDE_EP, _container, _env, _epp_config, _target_ports, launch
from tests.vllm.conftest import BLOCK_SIZE, MODEL, MODEL_DIR, VLLM_PYTHON, VllmServer, spawn_vllm, wait_ready

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

# What vLLM's DP supervisor makes of a command line: each child's port and global rank, and where its
# KV-event publisher binds (vLLM's own functions, so a change in vLLM shows here).
_SUPERVISOR_PROBE = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.launchers.dp_supervisor import (
    _build_vllm_dp_server_args, validate_multi_port_external_lb_args)
from vllm.distributed.kv_events import ZmqEventPublisher

args = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
validate_multi_port_external_lb_args(args)
children = []
for i in range(args.data_parallel_size_local):
    c = _build_vllm_dp_server_args(args, i)
    ev = c.kv_events_config
    children.append({"model": c.model_tag, "port": c.port, "rank": c.data_parallel_rank,
                     "external_lb": c.data_parallel_external_lb, "expert_parallel": c.enable_expert_parallel,
                     "kv_endpoint": ZmqEventPublisher.offset_endpoint_port(ev.endpoint, c.data_parallel_rank) if ev else None})
print(json.dumps(children))
"""


@needs_kubectl
def test_the_wide_ep_pods_commands_make_one_server_per_pool_port_in_vllm(tmp_path: Path):
    """Each wide-EP pod's vLLM command (precise variant), parsed and expanded by vLLM's own DP
    supervisor: local rank i serves on the i-th rank port, the group's ranks are 0..N-1 once each, and
    rank i of every pod binds its KV events at socketPort + i, where the EPP dials."""
    objs = render(WIDE_EP, components=("precise",), tree=ROOT)
    ports = _target_ports(objs)
    (producer,) = [p for p in yaml.safe_load(_epp_config(objs)[1])["plugins"] if p["type"] == "precise-prefix-cache-producer"]
    socket_port = producer["parameters"]["kvEventsConfig"]["podDiscoveryConfig"]["socketPort"]
    for group in GROUPS:
        lws = named(objs, "LeaderWorkerSet", group)
        size = lws["spec"]["leaderWorkerTemplate"]["size"]
        ranks: list[int] = []
        for worker in range(size):
            argv = launch(objs, group, worker, tmp_path)
            assert argv[0] == "serve"
            out = subprocess.run([str(VLLM_PYTHON), "-c", _SUPERVISOR_PROBE, json.dumps(argv[1:])],
                                 capture_output=True, text=True, timeout=180)  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
            children = json.loads(out.stdout.strip().splitlines()[-1])
            assert len(children) == len(ports)
            rank_ports = [c["port"] for c in children]
            if group.endswith("prefill"):
                assert rank_ports == ports
            else:  # behind the sidecar: its rank i (pool port i) forwards to vLLM's rank i
                base = int(_env(_container(lws, "vllm"))["RANK_PORT"])
                assert rank_ports == [base + i for i in range(len(ports))]
            assert all(c["external_lb"] and c["expert_parallel"] for c in children)
            assert [c["kv_endpoint"] for c in children] == [f"tcp://*:{socket_port + i}" for i in range(len(ports))]
            ranks += [c["rank"] for c in children]
        assert sorted(ranks) == list(range(size * len(ports))), group


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = spawn_vllm(tmp_path_factory.mktemp("vllm-dp"), core=0, dp_size=2)
    wait_ready(server)
    try:
        yield server
    finally:
        server.stop()


def _engine_series(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(kv.split("=", 1) for kv in line[len(name) + 1 : line.index("}")].split(","))
            out[labels["engine"].strip('"')] = out.get(labels["engine"].strip('"'), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def test_each_engine_has_its_metrics_and_publishes_its_kv_events_on_its_own_port(dp_server: VllmServer):
    server = dp_server
    rank_ports = [server.kv_port + r for r in range(server.dp_size)]
    # the EPP's subscriber, one endpoint per rank, each dialled at its own KV-event port
    index = KVBlockIndex()
    ds = Datastore()
    sub = KVEventSubscriber(ds, index, default_port=None)
    task = asyncio.create_task(sub.run())
    ds.set_endpoints([EndpointSpec(f"rank-{r}", "127.0.0.1", 9000 + r, labels={KV_EVENTS_PORT_LABEL: str(p)})
                      for r, p in enumerate(rank_ports)])  # fmt: skip
    # and raw subscriptions, to read the payload's DP-rank field
    ctx = zmq.Context()
    raw = []
    for p in rank_ports:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(f"tcp://127.0.0.1:{p}")
        raw.append(s)
    try:
        await asyncio.sleep(1.0)
        oa = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [f"Prompt {i}: " + f"data-parallel rank number {i} keeps its own cache. " * 10 for i in range(6)]
        for prompt in prompts:  # one at a time: vLLM's internal balancer alternates between idle engines
            await asyncio.to_thread(oa.completions.create, model=MODEL, prompt=prompt, max_tokens=1)
        tok = HFTokenizer(MODEL_DIR)
        holders: dict[str, int] = {}
        for prompt in prompts:
            keys = request_keys(tok.encode(prompt, add_special_tokens=True), BLOCK_SIZE, 256)
            for _ in range(100):
                if index.match(keys):
                    break
                await asyncio.sleep(0.05)
            match = index.match(keys)
            assert len(match) == 1, match  # each prompt's blocks are on the one rank that served it
            (address,) = match
            holders[address] = holders.get(address, 0) + 1
        assert set(holders) == {"127.0.0.1:9000", "127.0.0.1:9001"}, holders  # both ranks served and published
        assert sub.gaps == 0
        metrics = server.metrics_text()
        assert set(_engine_series(metrics, "vllm:num_requests_running")) == {"0", "1"}
        done = _engine_series(metrics, "vllm:request_success_total")
        assert done.keys() == {"0", "1"} and sum(done.values()) == len(prompts) and min(done.values()) >= 1
        for rank, s in enumerate(raw):
            frames = s.recv_multipart(zmq.NOBLOCK)
            assert frames[0] == server.topic.encode()  # one topic for the group: ranks differ by socket
            batch = msgspec.msgpack.decode(frames[2])
            assert batch[-1] == rank  # KVEventBatch(ts, events, data_parallel_rank)
    finally:
        for s in raw:
            s.close(linger=0)
        ctx.term()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
