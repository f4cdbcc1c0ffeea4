"""Two active-active EPP replicas behind the real Envoy (LEAST_REQUEST over the EPP cluster): they
share what each learns, and losing one, restarting both in turn or cutting them apart loses nothing
(bench.faults' replica scenarios, shorter)."""

from __future__ import annotations

import io
import json
import re
import time
import urllib.request

import httpx
import pytest
import yaml

from bench import faults
from extproc.cli.status import show_status
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy
LOAD_S = 3.0


def _runtime(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/runtime", timeout=5) as r:
        return json.load(r)


def _send(base_url: str, n: int, max_tokens: int = 2) -> None:
    with httpx.Client(timeout=10) as c:
        for i in range(n):
            prompt = f"[tenant {i % 4}] " + "shared instructions " * 20 + f" question {i} " + f"{i:05d} " * 20
            r = c.post(f"{base_url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
            assert r.status_code == 200, r.text


def _fit_samples(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/endpoints", timeout=5) as r:
        return sum(e["latency"]["samples"] for e in json.load(r)["endpoints"])


def test_sharing_replicas_end_up_with_the_same_prefix_index_and_each_routes_part(tmp_path):
    with make_stack(tmp_path, epp_replicas=2, envoy_concurrency=2) as s:
        _send(s.base_url, 40, max_tokens=1)  # one token: each response teaches the latency model its TTFT
        time.sleep(0.5)  # the last batch reaches the peer
        views = [_runtime(r.admin_port) for r in s.epp_replicas]
        samples = [_fit_samples(r.admin_port) for r in s.epp_replicas]
        out = io.StringIO()
        assert show_status(f"http://127.0.0.1:{s.epp_replicas[0].admin_port}", out=out) == 0
    shown = out.getvalue()
    assert "active-active peers:" in shown and "replica epp-0:" in shown
    assert re.search(rf"127\.0\.0\.1:{s.epp_replicas[1].peer_port}\s+yes", shown), shown
    sizes = [v["prefix_index_size"] for v in views]
    assert sizes[0] == sizes[1] > 0
    applied = [v["peers"]["records_applied"] for v in views]
    sent = [v["peers"]["records_sent"] for v in views]
    assert applied == sent[::-1] and all(applied)  # each applied every pick the other made
    assert all(p["connected"] for v in views for p in v["peers"]["peers"].values())
    # the latency fits learn from every response, whichever replica routed it
    observed = [v["peers"]["observations_next"] for v in views]
    assert all(observed) and sum(observed) == 40  # one TTFT observation per response (one token: no TPOT)
    assert [v["peers"]["observations_applied"] for v in views] == observed[::-1]
    assert samples == [40, 40]


def test_replicas_that_do_not_share_learn_only_their_own_picks(tmp_path):
    with make_stack(tmp_path, epp_replicas=2, epp_share=False, envoy_concurrency=2) as s:
        _send(s.base_url, 40)
        views = [_runtime(r.admin_port) for r in s.epp_replicas]
    assert all("peers" not in v for v in views)  # no exchange at all
    assert all(v["prefix_index_size"] > 0 for v in views)  # Envoy spread the requests over both


def test_killing_one_of_two_replicas_loses_nothing_with_fail_open_buffered(tmp_path):
    res = faults.replica_fault(tmp_path, fault="kill", body_mode="BUFFERED", fail_open=True, seconds=LOAD_S)
    assert res.sent > 50
    assert (res.failed, res.lost) == (0, 0), res


@pytest.mark.parametrize("fault", ["kill", "sigstop"])
def test_in_full_duplex_only_streams_the_faulted_replica_had_answered_fail(tmp_path, fault):
    # Envoy replays a stream that broke before the EPP answered on it (the ext_proc retry policy) to
    # the other replica; one whose pick or response was under way at the dead replica gets a 500.
    res = faults.replica_fault(tmp_path, fault=fault, body_mode="FULL_DUPLEX_STREAMED", fail_open=False, seconds=LOAD_S)
    assert res.sent > 50
    assert res.lost == 0 and res.failed == res.after_answer, res


@pytest.mark.parametrize("body_mode,fail_open", [("BUFFERED", True), ("FULL_DUPLEX_STREAMED", False)])
def test_a_rolling_restart_of_both_replicas_loses_nothing(tmp_path, body_mode, fail_open):
    res = faults.replica_fault(tmp_path, fault="rolling", body_mode=body_mode, fail_open=fail_open, seconds=LOAD_S)
    assert res.sent > 50
    assert (res.failed, res.lost) == (0, 0), res


def test_cut_apart_replicas_keep_serving_and_agree_again_after_healing(tmp_path):
    res = faults.replica_fault(tmp_path, fault="partition", body_mode="FULL_DUPLEX_STREAMED", fail_open=False, seconds=LOAD_S)
    assert (res.failed, res.lost) == (0, 0), res
    assert res.converged_s < 10


def test_epp_up_runs_two_sharing_replicas_behind_one_envoy(tmp_path):
    with faults.UpRun(tmp_path / "up", ["--replicas", "2"]) as up:
        text = up.output()
        assert "2 EPP replicas (sharing)" in text
        (second,) = re.findall(r"EPP replica 1: metrics http://127\.0\.0\.1:\d+/metrics   live views: epp status --url http://127\.0\.0\.1:(\d+)", text)
        first = int(re.search(r"EPP live views: epp status --url http://127\.0\.0\.1:(\d+)", text).group(1))
        _send(f"http://127.0.0.1:{up.port}/v1", 20)
        time.sleep(0.5)
        views = [_runtime(first), _runtime(int(second))]
        envoy = yaml.safe_load((tmp_path / "up" / "envoy.yaml").read_text())
    (epp,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "llm-epp"]
    assert epp["lb_policy"] == "LEAST_REQUEST" and len(epp["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert views[0]["prefix_index_size"] == views[1]["prefix_index_size"] > 0
    assert all(p["connected"] for v in views for p in v["peers"]["peers"].values())
