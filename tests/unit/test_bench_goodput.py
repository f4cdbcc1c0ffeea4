"""Goodput under an SLO (bench.common) and how bench.pd and bench.quality count and print it; the
quality workloads' shapes (issue 16's optimized-baseline and agent mixes). No process is started."""

from __future__ import annotations

import json
import math

import pytest

from bench import pd, quality
from bench.common import Slo, goodput, goodput_ratio, max_over_fair, slo_from_flags
from bench.routing import Outcome
from vllm_sim.tokens import BYTES_PER_TOKEN

SLO = Slo(ttft_s=1.0, itl_s=0.05)


# -- the SLO and the goodput count ------------------------------------------------------------------


def test_a_request_at_both_bounds_meets_the_slo():
    assert SLO.met(1.0, 0.05)


@pytest.mark.parametrize("ttft,itl", [(1.001, 0.01), (0.1, 0.051), (None, 0.01), (None, None)])
def test_a_request_over_either_bound_or_without_a_first_token_misses(ttft, itl):
    assert not SLO.met(ttft, itl)


def test_a_one_token_answer_is_judged_on_its_ttft_alone():
    assert SLO.met(0.5, None)
    assert not SLO.met(1.5, None)


def test_goodput_counts_requests_meeting_both_bounds_per_second():
    requests = [(0.2, 0.02), (0.3, 0.08), (1.5, 0.02), (None, None), (0.9, None)]
    gp = goodput(requests, SLO, seconds=2.0)
    assert (gp.good, gp.total) == (2, 5)
    assert gp.per_s == pytest.approx(1.0)
    assert gp.share == pytest.approx(0.4)
    # each bound on its own: TTFT missed by the 1.5 s one and the failed one; ITL by the 80 ms one
    # and the failed one
    assert (gp.ttft_met, gp.itl_met) == (3, 3)


def test_goodput_of_no_requests_is_zero_per_second_and_has_no_share():
    gp = goodput([], SLO, seconds=5.0)
    assert gp.per_s == 0.0
    assert math.isnan(gp.share)


def test_goodput_over_no_time_is_undefined():
    assert math.isnan(goodput([(0.1, 0.01)], SLO, seconds=0.0).per_s)


@pytest.mark.parametrize("ttft,itl", [(0.0, 0.05), (1.0, -1.0)])
def test_an_slo_needs_positive_bounds(ttft, itl):
    with pytest.raises(ValueError, match="must be > 0"):
        Slo(ttft, itl)


def test_flags_replace_only_the_bound_they_name_in_milliseconds():
    assert slo_from_flags(SLO, None, None) == SLO
    assert slo_from_flags(SLO, 250, None) == Slo(0.25, 0.05)
    assert slo_from_flags(SLO, None, 20) == Slo(1.0, 0.02)


def test_the_label_names_both_bounds_in_milliseconds():
    assert Slo(0.5, 0.025).label() == "TTFT<=500ms ITL<=25ms"


def test_goodput_ratio_against_a_baseline_that_met_nothing_is_infinite():
    assert goodput_ratio(2.0, 0.0) == "inf"
    assert goodput_ratio(0.0, 0.0) == "-"
    assert goodput_ratio(3.0, 2.0) == "1.50x"


def test_max_over_fair_is_the_busiest_endpoints_share_times_the_endpoints():
    assert max_over_fair([25, 25, 25, 25], 4) == pytest.approx(1.0)
    assert max_over_fair([100], 4) == pytest.approx(4.0)  # one endpoint served everything
    assert max_over_fair([60, 40], 4) == pytest.approx(2.4)  # two of four idle
    assert math.isnan(max_over_fair([], 4))


# -- bench.pd ---------------------------------------------------------------------------------------


def _pd_run(samples: list[pd.Sample]) -> pd.Run:
    return pd.Run(pd.Config("agg-4gpu", None, sims=4), pd.MIXES[0], samples, duration=2.0)


def test_pd_goodput_misses_unfinished_and_failed_requests():
    run = _pd_run([
        pd.Sample(ttft=0.2, itl=0.02, e2e=0.8),
        pd.Sample(ttft=0.2, itl=0.04, e2e=1.5),  # decode too slow
        pd.Sample(unfinished=True),
        pd.Sample(error="HTTP 503"),
    ])
    gp = run.goodput(Slo(1.0, 0.025))
    assert (gp.good, gp.total, gp.per_s) == (1, 4, 0.5)


def test_pd_default_bounds_follow_the_simulator_time_scale_but_flags_do_not():
    mix = pd.MIXES[0]
    assert pd.mix_slo(mix, pd.DEFAULT_TIME_SCALE, None, None) == mix.slo
    assert pd.mix_slo(mix, 2 * pd.DEFAULT_TIME_SCALE, None, None) == mix.slo.scaled(2)
    assert pd.mix_slo(mix, 4.0, 800, 30) == Slo(0.8, 0.03)


def test_pd_report_prints_the_bounds_and_goodput_against_the_baseline():
    agg = pd.Run(pd.CONFIGS[0], pd.MIXES[0], [pd.Sample(ttft=0.2, itl=0.04, e2e=1.0)] * 2 + [pd.Sample(ttft=0.2, itl=0.02, e2e=1.0)] * 2, 2.0)
    split = pd.Run(pd.CONFIGS[1], pd.MIXES[0], [pd.Sample(ttft=0.5, itl=0.02, e2e=1.0)] * 3, 2.0)
    text = pd.report(pd.MIXES[0], [agg, split], 12, 2.0, 2.0, Slo(1.0, 0.025))
    assert "SLO: TTFT <= 1000 ms and mean ITL <= 25 ms" in text
    assert "goodput/s TTFT<=1000ms ITL<=25ms" in text.splitlines()[1]
    row = next(line for line in text.splitlines() if line.startswith("pd-2p2d"))
    assert "1.50" in row and row.rstrip().endswith("1.50x")  # 1.5 good/s vs 1.0 good/s


# -- bench.quality ----------------------------------------------------------------------------------


def _outcome(server: str, ttft: float | None, itl: float | None, error: str | None = None) -> Outcome:
    return Outcome(0, served_by=server, ttft=ttft, itl=itl, e2e=1.0, output_tokens=20, error=error,
                   prompt_tokens=1000, cached_tokens=800)  # fmt: skip


def test_quality_goodput_counts_failed_requests_as_missed():
    r = quality.Result("best", [_outcome("a", 0.1, 0.02), _outcome("a", 0.1, 0.02, error="TimeoutError")], 2.0, 0.5, {"a": 1})
    gp = r.goodput(SLO)
    assert (gp.good, gp.total, gp.per_s) == (1, 2, 0.5)


def test_quality_table_prints_the_bounds_first_touches_fair_shares_and_goodput_ratios():
    sc = quality.Scenario("mix", (quality.Session(0.0, 0, (b"",)), quality.Session(0.1, 0, (b"", b""))), 4, (), "note", SLO)
    rr = quality.Result("round-robin", [_outcome(s, 0.5, 0.02) for s in "abcd"], 4.0, 0.5, {s: 1 for s in "abcd"})
    best = quality.Result("best", [_outcome("a", 0.2, 0.02)] * 3 + [_outcome("b", 2.0, 0.02)], 4.0, 0.9, {"a": 3, "b": 1})
    text = quality.summarize(sc, [rr, best], SLO)
    lines = text.splitlines()
    assert "first touches" in lines[1] and "1 of 3 requests (33.3%)" in lines[1]
    assert "SLO: TTFT <= 1000 ms and mean ITL <= 50 ms" in lines[1]
    assert "goodput/s TTFT<=1000ms ITL<=50ms" in lines[2]
    assert "3.00x" in next(line for line in lines if line.startswith("best "))  # 3 of 4 requests on one of 4 endpoints
    assert "0.75x" in next(line for line in lines if "best vs round-robin" in line)  # goodput 0.75/s vs 1.0/s
    assert "endpoints over 2x their fair share: best (3.00x)" in text


# -- the workloads issue 16 is judged on ------------------------------------------------------------


def _messages(body: bytes) -> list[dict[str, str]]:
    return json.loads(body)["messages"]  # type: ignore[no-any-return]


def _tokens(text: str) -> int:
    return len(text.encode()) // BYTES_PER_TOKEN


def _blocks_per_server(sc: quality.Scenario) -> int:
    return int(sc.sim_args[sc.sim_args.index("--num-gpu-blocks") + 1])


@pytest.mark.parametrize("quick", [True, False])
def test_optimized_baseline_contexts_overflow_one_server_but_fit_the_pool(quick):
    sc = quality.optimized_baseline(quick)
    contexts = {_messages(b)[0]["content"] for s in sc.sessions for b in s.bodies}
    context_blocks = sum(math.ceil(_tokens(c) / 16) for c in contexts)
    per_server = _blocks_per_server(sc)
    assert context_blocks > 2 * per_server  # no single server can hold them
    assert context_blocks < 0.85 * sc.sims * per_server  # the pool holds them, with room for questions


@pytest.mark.parametrize("quick", [True, False])
def test_optimized_baseline_is_many_groups_of_few_users_with_long_contexts_and_questions(quick):
    sc = quality.optimized_baseline(quick)
    bodies = [_messages(b) for s in sc.sessions for b in s.bodies]
    assert len({m[0]["content"] for m in bodies}) >= 4 * sc.sims  # many groups
    assert {len({m[1]["content"] for m in bodies if m[0]["content"] == c}) for c in {m[0]["content"] for m in bodies}} <= {1, 2, 3, 4, 5}
    assert all(5_500 <= _tokens(m[0]["content"]) <= 6_500 for m in bodies)
    assert all(1_100 <= _tokens(m[1]["content"]) <= 1_300 for m in bodies)


@pytest.mark.parametrize("quick", [True, False])
def test_optimized_baseline_first_touch_misses_are_under_a_tenth(quick):
    sc = quality.optimized_baseline(quick)
    assert quality.first_touches(sc) / sc.requests < 0.10


AGENT_WORKLOADS = [quality.agent, quality.agent_short]


@pytest.mark.parametrize("make", AGENT_WORKLOADS)
@pytest.mark.parametrize("quick", [True, False])
def test_agent_conversations_share_one_long_system_prompt_and_grow_turn_by_turn(make, quick):
    sc = make(quick)
    systems = {_messages(b)[0]["content"] for s in sc.sessions for b in s.bodies}
    assert len(systems) == 1 and len(next(iter(systems))) >= 20_000  # tens of thousands of characters
    for s in sc.sessions:
        turns = [_messages(b) for b in s.bodies]
        assert len(turns) >= 3
        for before, after in zip(turns, turns[1:]):
            assert after[: len(before)] == before  # each turn carries the whole conversation so far


@pytest.mark.parametrize("make", AGENT_WORKLOADS)
@pytest.mark.parametrize("quick", [True, False])
def test_agent_histories_overflow_one_server_but_fit_the_pool(make, quick):
    sc = make(quick)
    system = _tokens(_messages(sc.sessions[0].bodies[0])[0]["content"])
    own = sum(sum(_tokens(m["content"]) for m in _messages(s.bodies[-1])[1:]) for s in sc.sessions)
    server_tokens = _blocks_per_server(sc) * 16
    assert own > 2 * server_tokens
    assert own + sc.sims * system < sc.sims * server_tokens


def test_agent_is_long_conversations_and_agent_short_the_same_history_in_half_the_turns():
    def shape(sc):
        return len(sc.sessions), {len(s.bodies) for s in sc.sessions}

    assert shape(quality.agent(False)) == (16, {16})  # agents run tens of tool calls
    assert shape(quality.agent_short(False)) == (32, {8})
    assert quality.agent(False).requests == quality.agent_short(False).requests


def test_a_seed_changes_the_requests_but_not_the_shape():
    a, b = quality.agent(True, 4), quality.agent(True, 5)
    assert a.sessions[0].bodies != b.sessions[0].bodies
    assert (len(a.sessions), a.requests) == (len(b.sessions), b.requests)


def test_every_workload_has_a_default_slo_and_the_ones_issue_16_names_exist():
    assert {"b2b", "optimized_baseline", "agent"} <= set(quality.SCENARIOS)
    for make in quality.SCENARIOS.values():
        sc = make(True)
        assert sc.slo.ttft_s > 0 and sc.slo.itl_s > 0


def test_pd_configs_subset_brings_its_baselines_in_run_order_and_refuses_unknown_names():
    names = [c.name for c in pd.select("pd-cpu2p-gpu2d-latency, pd-2p2d-latency")]
    assert names == ["agg-4gpu", "pd-2p2d-latency", "agg-2gpu", "pd-cpu2p-gpu2d-latency"]
    assert pd.select(None) == pd.CONFIGS
    with pytest.raises(ValueError, match="unknown config"):
        pd.select("pd-9p9d")
    assert {c.epp_config.name for c in pd.CONFIGS if c.pd is not None and c.name.endswith("-latency")} == {"pd-latency.yaml"}
