"""bench.wide_ep: its configs load, rank-0-only hides the other ranks, the table reads its runs."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from bench.pd import Sample
from bench.wide_ep import PD_SETUPS, SETUPS, Rank0Stack, Run, report
from extproc.devstack.stack import StackOptions
from pickers.config.loader import load_config
from pickers.plugins.base import PluginContext


def test_every_setup_config_loads():
    for setup in (*SETUPS, *PD_SETUPS):
        if setup.config_text is not None:
            load_config(setup.config_text, setup.name, PluginContext(rng=random.Random(0)))


def test_the_round_robin_pd_setup_has_one_picker_per_profile():
    rr = next(s for s in PD_SETUPS if s.name == "round-robin")
    cfg = load_config(rr.config_text or "", "rr", PluginContext(rng=random.Random(0)))
    pickers = {id(p.picker) for p in cfg.profiles}
    assert len(pickers) == 2


def test_rank0_only_lists_one_port_per_group(tmp_path: Path):
    stack = Rank0Stack(StackOptions(workdir=tmp_path))
    entries = [{"address": "127.0.0.1", "port": 9000 + r, "rank": r, "dpGroup": "dp-0"} for r in range(4)]
    stack.endpoints = [("127.0.0.1", 9000 + r) for r in range(4)]
    stack.prefill_endpoints = list(stack.endpoints)
    stack._write_endpoints(entries)
    written = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())["endpoints"]
    assert [e["port"] for e in written] == [9000]
    assert stack.endpoints == stack.prefill_endpoints == [("127.0.0.1", 9000)]


def test_report_compares_every_row_with_the_first():
    a, b = Run(SETUPS[0], duration=2.0), Run(SETUPS[1], duration=2.0)
    a.samples = [Sample(ttft=0.1, itl=0.02, tokens_in_window=100)]
    b.samples = [Sample(ttft=0.2, itl=0.04, tokens_in_window=50)]
    a.spread, b.spread = [1.0, 1.5], [2.0]
    text = report("t", [a, b])
    row = text.splitlines()[-1]
    assert "2.00x" in row and "0.50x" in row and "2.00" in row
