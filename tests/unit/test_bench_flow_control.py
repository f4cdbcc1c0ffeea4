"""bench.flow_control's pure parts: the workload, outcome classes, fair shares, Jain's index, the
flow-control gauge reader and the table; no process is started."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from bench.common import percentile
from bench.flow_control import (
    OBJECTIVES,
    Outcome,
    Pool,
    RunResult,
    Sample,
    Workload,
    classify,
    fair_shares,
    fairness,
    fc_queue_by_priority,
    flow_control_config,
    goals,
    jain,
    objectives_file,
    plan,
    summarize,
    to_json,
)

TENANTS = ["heavy", "light-a", "light-b"]


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert math.isnan(percentile([], 90))


def test_jain_is_one_when_equal_and_one_over_n_when_one_gets_everything():
    assert jain([2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert jain([3.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain([1.0, 2.0]) == pytest.approx(9 / 10)
    assert math.isnan(jain([]))


def test_fair_share_gives_small_demands_in_full_and_splits_the_rest_evenly():
    assert fair_shares({"a": 1.0, "b": 5.0, "c": 5.0}, 7.0) == pytest.approx({"a": 1.0, "b": 3.0, "c": 3.0})
    assert fair_shares({"a": 6.0, "b": 2.0, "c": 2.0}, 3.0) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    # more capacity than demand: everybody gets what they asked for
    assert fair_shares({"a": 1.0, "b": 2.0}, 10.0) == pytest.approx({"a": 1.0, "b": 2.0})
    assert fair_shares({"a": 0.0, "b": 4.0}, 2.0) == pytest.approx({"a": 0.0, "b": 2.0})


def test_fairness_compares_served_tokens_to_the_fair_share_of_what_was_served():
    outs = [Outcome("batch", "heavy", 10, kind="served", tokens=10) for _ in range(6)]
    outs += [Outcome("batch", "light-a", 10, kind="served", tokens=10), Outcome("batch", "light-a", 10, kind="rejected")]
    outs += [Outcome("batch", "light-b", 10, kind="served", tokens=10), Outcome("batch", "light-b", 10, kind="rejected")]
    f = fairness(outs, TENANTS)
    # 80 tokens served; the fair split of 80 given offers of 60/20/20 is 40/20/20: heavy got 60, the light ones 10
    assert f.share == pytest.approx({"heavy": 0.75, "light-a": 0.125, "light-b": 0.125})
    assert f.ratio == pytest.approx({"heavy": 1.5, "light-a": 0.5, "light-b": 0.5})
    assert f.jain == pytest.approx(jain(list(f.ratio.values())))
    even = fairness([Outcome("batch", t, 10, kind="served", tokens=10) for t in TENANTS], TENANTS)
    assert even.jain == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("status", "reason", "completed", "kind"),
    [
        (200, "", True, "served"),
        (200, "", False, "cut"),
        (429, "rejected-saturated", False, "rejected"),
        (503, "rejected-ttl-expired", False, "rejected"),
        (429, "evicted", False, "evicted"),
        (200, "evicted-priority", False, "evicted"),
        (500, "", False, "other"),
        (None, "", False, "lost"),
    ],
)
def test_each_outcome_gets_one_kind(status, reason, completed, kind):
    assert classify(status, reason, completed) == kind


def test_the_plan_is_seeded_and_splits_load_by_tenant_and_objective():
    w = Workload(duration_s=200.0, seed=3)
    a, b = plan(w, 10.0), plan(w, 10.0)
    assert [p.body for p in a] == [p.body for p in b]
    assert all(0 < p.at < w.duration_s for p in a)
    heavy = sum(p.tenant == "heavy" for p in a) / len(a)
    inter = sum(p.objective == "interactive" for p in a) / len(a)
    assert 0.55 < heavy < 0.65 and 0.25 < inter < 0.35
    body = json.loads(a[0].body)
    assert body["stream"] and body["max_tokens"] == a[0].max_tokens


def test_the_queue_gauge_is_summed_by_priority_from_one_family():
    text = """\
# HELP llm_d_epp_flow_control_queue_size Current number of requests actively held in the Flow Control queue.
# TYPE llm_d_epp_flow_control_queue_size gauge
llm_d_epp_flow_control_queue_size{fairness_id="heavy",priority="-1",inference_pool="p"} 7
llm_d_epp_flow_control_queue_size{fairness_id="light-a",priority="-1",inference_pool="p"} 2
llm_d_epp_flow_control_queue_size{fairness_id="heavy",priority="10",inference_pool="p"} 1
inference_extension_flow_control_queue_size{fairness_id="heavy",priority="-1"} 7
llm_d_epp_flow_control_queue_bytes{fairness_id="heavy",priority="-1",inference_pool="p"} 9000
"""
    assert fc_queue_by_priority(text) == {"-1": 9.0, "10": 1.0}
    assert fc_queue_by_priority('inference_extension_flow_control_queue_size{priority="0"} 3\n') == {"0": 3.0}
    assert fc_queue_by_priority("inference_pool_average_queue_size{name=\"p\"} 4\n") is None


def test_the_flow_control_config_has_the_guides_shape():
    for detector in ("concurrency", "utilization"):
        doc = yaml.safe_load(flow_control_config(Pool(), 12.0, True, detector))
        assert doc["featureGates"] == ["flowControl"]
        fc = doc["flowControl"]
        assert fc["defaultRequestTTL"] == "12s" and fc["enableEviction"] is True
        names = {p.get("name", p["type"]): p["type"] for p in doc["plugins"]}
        assert names[fc["saturationDetector"]["pluginRef"]] == f"{detector}-detector"
        assert sorted(b["priority"] for b in fc["priorityBands"]) == sorted(OBJECTIVES.values())
        assert {names[b["fairnessPolicyRef"]] for b in fc["priorityBands"]} == {"round-robin-fairness-policy"}
    assert yaml.safe_load(objectives_file()) == [{"name": n, "priority": p} for n, p in OBJECTIVES.items()]


def _result() -> RunResult:
    outs = [Outcome("interactive", t, 16, kind="served", status=200, ttft=0.1 * (i + 1), tokens=16) for i, t in enumerate(TENANTS)]
    outs += [Outcome("batch", "heavy", 16, kind="rejected", status=429, reason="rejected-saturated"), Outcome("batch", "light-a", 16)]
    outs += [Outcome("batch", "light-b", 16, kind="served", status=200, ttft=0.2, tokens=16)]
    samples = [Sample(float(t), t, 12, 20 + t, {"10": 1.0, "-1": 5.0}, 65_000 + t) for t in range(5)]
    return RunResult("on", unloaded_ttft=[0.1, 0.1, 0.2], outcomes=outs, samples=samples, after_drain=samples[0], wall_s=5.0)


def test_the_table_has_a_row_per_objective_and_tenant_and_says_when_on_is_missing():
    off = _result()
    off.config = "off"
    refused = RunResult("on", available=False, why_not="featureGates[0]: flowControl=true is not supported")
    text = summarize([off, refused], TENANTS)
    lines = text.splitlines()
    assert sum(ln.startswith("off ") and "over time" not in ln for ln in lines) == len(OBJECTIVES) * (len(TENANTS) + 1) + 1
    assert "on: flow control: not available in this build (featureGates[0]: flowControl=true is not supported)" in text
    assert "lost 1 (goal 0)" in text
    assert "FC queued prio  10" in text and "FC queued prio  -1" in text


def test_the_goals_are_ratios_of_the_same_run():
    g = goals(_result(), TENANTS)
    assert g.unloaded_p90 == pytest.approx(0.2) and g.loaded_p90 == pytest.approx(0.3)
    assert g.ttft_ratio == pytest.approx(1.5)
    assert g.lost == 1
    # batch: only light-b was served, so light-a got none of its fair share
    assert g.light_min_ratio == pytest.approx(0.0)
    assert g.rss_max_mb == pytest.approx(65_004 / 1024)
    both = summarize([_result(), _result()], TENANTS)
    assert "interactive TTFT p90 1.00x" in both
    assert json.dumps(to_json([_result()], {"seed": 1}, TENANTS))
