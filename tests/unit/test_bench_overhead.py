"""bench.overhead's arithmetic: CPU net of the idle rate, the ratio to the no-op server, the parent's
share and ceilings with workers, the fixed-load table (no processes started)."""

from __future__ import annotations

from bench.http1 import LoadResult
from bench.overhead import Measured, Settings, _net, summarize, worker_notes


def _load(ok: int, wall: float) -> LoadResult:
    r = LoadResult(latencies=[0.01] * ok, wall_s=wall)
    r.statuses[200] = ok
    return r


def _measured(name: str, epp: float | None, idle: float = 0.0, parent: float | None = None, ok: int = 1000) -> Measured:
    cpu = {"envoy": 0.0004, "backend": 0.0001, "loadgen": 0.0001}
    if epp is not None:
        cpu["epp"] = epp
        cpu["epp-parent"] = epp if parent is None else parent
    m = Measured(name, _load(ok, 1.0), _load(10, 1.0), cpu, 1.0, 2.0, (epp or 0.0) * ok, idle)
    return m


def test_cpu_net_of_idle_takes_the_per_second_rate_off_each_request():
    m = _measured("(d) epp", 0.0012, idle=0.1)  # 1,000 requests in 1 s: 0.1 ms of idle per request
    assert abs(_net(m) - 0.0011) < 1e-12


def test_the_summary_divides_by_the_no_op_servers_cpu():
    s = Settings()
    results = [_measured("(b) envoy + no-op ext_proc", 0.001), _measured("(d) envoy + EPP default", 0.0012)]
    results[1].paced = _measured("(d) envoy + EPP default", 0.0015)
    results[0].paced = _measured("(b) envoy + no-op ext_proc", 0.001)
    text = summarize(results, s)
    row = next(line for line in text.splitlines() if line.startswith("(d)"))
    assert "1.20x" in row
    assert f"at {s.rate:g} req/s" in text and "1.50x" in text


def test_with_workers_the_parents_share_gives_the_ceiling():
    # the idle rate (the metrics scraping, in the workers) comes off the workers' 1.2 ms: 0.05 ms a request
    m = _measured("(e) workers", 0.0014, idle=0.05, parent=0.0002)
    (note,) = worker_notes([m, _measured("(d) one process", 0.0012)])
    assert "parent 0.20 ms/request" in note and "5,000 req/s" in note
    assert "workers 1.15 ms/request" in note


def test_the_guardrails_gateway_runs_the_default_config_with_both_admitters_and_an_audit_file(tmp_path):
    from bench.overhead import MODEL, guardrail_notes, guardrails_args
    from pickers.config.loader import load_config_file
    from pickers.plugins.base import PluginContext

    args = guardrails_args(tmp_path)
    assert args[2:5] == ("--audit-sink", "file", "--audit-file")
    cfg = load_config_file(args[1], PluginContext())
    assert {type(p).__name__ for p in cfg.producers} == {"RequestLimitsAdmitter", "ContentCheckAdmitter"}
    assert MODEL in str(cfg.plugin_parameters["limits"])  # the bench's model passes the allow list
    assert [s.scorer.type for s in cfg.profiles[0].scorers] == ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]
    d, g = _measured("(d) epp", 0.0010), _measured("(g) epp + guardrails", 0.00105)
    assert guardrail_notes([d, g]) == ["(g) vs (d), guardrails on vs off: EPP cpu/req 1.05x, net of idle 1.05x"]


def test_a_baseline_checkout_adds_each_epp_config_again_with_its_code_first_on_the_path(tmp_path):
    import pytest

    from bench.overhead import CONFIGS, with_baseline

    (tmp_path / "extproc" / "cli").mkdir(parents=True)
    picked = [c for c in CONFIGS if c[0][1] in "abdh"]
    out = with_baseline(picked, str(tmp_path))
    names = [n for n, _ in out]
    assert names == [picked[0][0], picked[1][0], picked[2][0], picked[2][0] + " (baseline)", picked[3][0], picked[3][0] + " (baseline)"]
    base = dict(out)[picked[2][0] + " (baseline)"]
    assert base["extra_env"] == {"PYTHONPATH": str(tmp_path)} and base["epp_args"] == picked[2][1]["epp_args"]
    with pytest.raises(SystemExit, match="not an llm-epp checkout"):
        with_baseline(picked, str(tmp_path / "nowhere"))
