"""The local stack's P/D data-parallel groups (`epp up --pd --dp-groups G --dp-size N`): prefill groups
whose ranks are prefill endpoints, decode groups each behind one DP pd-sidecar with a port per rank,
every rank its own endpoint (rank, dpGroup, role; decode: metricsPort = its simulator's port). Requests
go Envoy -> the EPP (pickers/configs/pd.yaml) -> a decode rank's sidecar port -> a prefill rank, then
that decode rank's simulator."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench import faults
from extproc.cli.main import PD_CONFIG, main
from extproc.datalayer.endpoints_file import load_endpoints_file
from extproc.devstack.stack import LocalStack, PdPool, StackError, StackOptions
from tests.integration.conftest import FAST_SIM, MODEL, make_stack
from tests.integration.test_gateway import log_for

GROUPS, SIZE = 2, 2
ROLES = ("prefill", "decode")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def long_prompt() -> str:
    """~1,100 tokens nobody has seen: well over pd.yaml's nonCachedTokens (512), so always disaggregated."""
    return f"[{uuid.uuid4()}] " + "Summarise the quarterly report on shipping delays. " * 85


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    pool = PdPool(prefill=GROUPS, decode=GROUPS, dp_size=SIZE)
    with make_stack(tmp_path_factory.mktemp("pd-dp-stack"), pd=pool, epp_args=("--config-file", str(PD_CONFIG))) as s:
        yield s


@pytest.mark.envoy
def test_every_rank_of_both_roles_is_an_endpoint_with_rank_group_role_and_metrics_port(stack) -> None:
    assert stack.endpoints_path is not None
    specs = load_endpoints_file(stack.endpoints_path)
    assert [(s.name, s.rank, s.dp_group, s.labels["llm-d.ai/role"]) for s in specs] == [
        (f"{role}-{g}-rank-{r}", r, f"{role}-{g}", role) for role in ROLES for g in range(GROUPS) for r in range(SIZE)]
    prefill, decode = specs[:GROUPS * SIZE], specs[GROUPS * SIZE:]
    assert all(s.metrics_port is None for s in prefill)
    assert stack.prefill_endpoints == [("127.0.0.1", s.port) for s in prefill]
    # Decode ranks are the sidecar's rank ports; their metrics are scraped from the rank's own simulator.
    assert [s.port for s in decode] == stack.sidecar_ports
    assert [s.metrics_port for s in decode] == [p for g in range(GROUPS) for p in stack.dp_sim_ports[f"decode-{g}"]]
    assert stack.dp_ranks == {f"{role}-{g}": [("127.0.0.1", s.port) for s in specs if s.dp_group == f"{role}-{g}"]
                              for role in ROLES for g in range(GROUPS)}
    for g in range(GROUPS):
        for r, port in enumerate(stack.dp_sim_ports[f"decode-{g}"]):
            assert get(f"http://127.0.0.1:{port}/sim/stats")["data_parallel_rank"] == r
    views = get(f"http://127.0.0.1:{stack.epp_admin_port}/debug/endpoints")["endpoints"]
    assert sorted((v["role"], v["dp_group"], v["rank"]) for v in views) == sorted(
        (role, f"{role}-{g}", r) for role in ROLES for g in range(GROUPS) for r in range(SIZE))


def test_envoy_fallbacks_are_the_decode_ranks_sidecar_ports_never_a_prefill_rank(stack) -> None:
    # serving_endpoints are what Envoy's fail-open and override-host fallbacks list (start_envoy).
    assert stack.serving_endpoints == [("127.0.0.1", p) for p in stack.sidecar_ports]
    assert len(stack.sidecar_ports) == GROUPS * SIZE


@pytest.mark.envoy
def test_requests_go_from_a_prefill_rank_to_the_picked_decode_rank_and_every_rank_serves(stack) -> None:
    rank_of_sidecar_port = {port: (f"decode-{g}", r) for g in range(GROUPS)
                            for r, (_, port) in enumerate(stack.dp_ranks[f"decode-{g}"])}
    prefill_ports = [p for _, p in stack.prefill_endpoints]
    decode_sims = [p for g in range(GROUPS) for p in stack.dp_sim_ports[f"decode-{g}"]]

    def legs() -> tuple[list[int], list[int]]:
        return ([get(f"http://127.0.0.1:{p}/sim/stats")["prefill_legs_total"] for p in prefill_ports],
                [get(f"http://127.0.0.1:{p}/sim/stats")["decode_legs_total"] for p in decode_sims])

    async def burst(n: int) -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(timeout=30) as http:
            ids = [f"pd-dp-{uuid.uuid4()}" for _ in range(n)]
            responses = await asyncio.gather(*(
                http.post(f"{stack.base_url}/completions", headers={"x-request-id": rid},
                          json={"model": MODEL, "prompt": long_prompt(), "max_tokens": 4}) for rid in ids))
            return list(zip(ids, responses, strict=True))

    before = legs()
    sent = 0
    for _ in range(6):  # idle ranks tie and the picker breaks ties at random: until every rank has served
        done = asyncio.run(burst(8))
        sent += len(done)
        for rid, r in done:
            assert r.status_code == 200, r.text
            # Envoy went to a decode rank's sidecar port; that rank's own simulator decoded.
            group, rank = rank_of_sidecar_port[int(log_for(stack, rid)["upstream"].rsplit(":", 1)[1])]
            assert r.headers["x-served-by"] == f"127.0.0.1:{stack.dp_sim_ports[group][rank]}"
        after = legs()
        prefilled = [a - b for a, b in zip(after[0], before[0], strict=True)]
        decoded = [a - b for a, b in zip(after[1], before[1], strict=True)]
        if all(prefilled) and all(decoded):
            break
    assert sum(prefilled) == sent and sum(decoded) == sent  # every request: one remote prefill, one decode
    assert all(prefilled) and all(decoded), (prefilled, decoded)


class _PdDpUpRun(faults.UpRun):
    def __init__(self, workdir: Path, *args: str) -> None:
        super().__init__(workdir)
        self.argv = [sys.executable, "-m", "extproc.cli", "up", "--port", "0", "--workdir", str(workdir),
                     "--time-scale", "0.02", "--model", MODEL, *args]


@pytest.mark.envoy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children found through /proc")
def test_epp_up_pd_dp_groups_serves_through_a_prefill_rank_and_a_decode_rank(tmp_path: Path) -> None:
    with _PdDpUpRun(tmp_path, "--pd", "--dp-groups", "2", "--dp-size", "2", "--prefill", "1") as up:
        assert "1 prefill + 2 decode data-parallel groups of 2 ranks" in up.output()
        entries = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())["endpoints"]
        assert [(e["dpGroup"], e["rank"], e["labels"]["llm-d.ai/role"]) for e in entries] == [
            ("prefill-0", 0, "prefill"), ("prefill-0", 1, "prefill"), ("decode-0", 0, "decode"),
            ("decode-0", 1, "decode"), ("decode-1", 0, "decode"), ("decode-1", 1, "decode")]
        r = httpx.post(f"http://127.0.0.1:{up.port}/v1/completions",
                       json={"model": MODEL, "prompt": long_prompt(), "max_tokens": 2}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by"] in {f"127.0.0.1:{e['metricsPort']}" for e in entries[2:]}
        assert sum(get(f"http://127.0.0.1:{e['port']}/sim/stats")["prefill_legs_total"] for e in entries[:2]) == 1
        assert "--config-file" in (argv := next(a for a in up.children().values() if a[3:4] == ["serve"]))
        assert argv[argv.index("--config-file") + 1] == str(PD_CONFIG)
        assert len(up.children()) == 7  # three group simulators, two sidecars, the EPP, Envoy
        assert up.stop() == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--pd", "--dp-groups", "2", "--prefill", "1", "--decode", "1"], "give --dp-groups with at most one of them"),
    (["--pd", "--dp-groups", "2", "--decode", "0"], "expected --prefill >= 0 and --decode >= 1 groups"),
    (["--pd", "--dp-groups", "0"], "expected --dp-groups >= 1"),
    (["--pd", "--dp-groups", "2", "--dp-size", "0"], "--dp-size >= 1"),
    (["--pd", "--dp-groups", "2", "--sims", "3"], "cannot be combined with --sims or --endpoints"),
    (["--pd", "--dp-size", "2"], "give --dp-groups too"),
])
def test_bad_pd_dp_group_flags_are_refused(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main(["up", "--workdir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("pool", "kv_events", "message"), [
    (PdPool(decode=0, dp_size=2), False, "expected prefill >= 0, decode >= 1 and dp_size >= 1"),
    (PdPool(), True, "the P/D pool's plain simulators publish no KV events"),
])
def test_bad_pd_pools_are_refused_before_anything_starts(pool: PdPool, kv_events: bool, message: str,
                                                          tmp_path: Path) -> None:
    stack = LocalStack(StackOptions(workdir=tmp_path, sim_args=FAST_SIM, pd=pool, kv_events=kv_events))
    with pytest.raises(StackError, match=message):
        stack.start()
    assert not stack.procs
