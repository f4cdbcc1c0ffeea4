"""No port race: stacks (a simulator with its KV-event port, the EPP with its four ports, Envoy with
its listener and admin) start one after another while another process churns through loopback ports
(tests/integration/port_churn.py), and every start succeeds. With ports chosen by binding port 0 and
closing it (the old `free_port()`), 3 to 5 of the 8 starts failed in each of six runs under this
churn ("Address already in use" from a simulator, its ZMQ publisher, the EPP or Envoy), none
without it; ports the stack holds (extproc/devstack/ports.py) cannot be taken."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from extproc.devstack.stack import LocalStack, StackError, StackOptions, _die_with_parent
from tests.integration.conftest import FAST_SIM, MODEL

pytestmark = [pytest.mark.envoy, pytest.mark.slow, pytest.mark.timeout(300)]
STACKS = 8


@pytest.fixture
def port_churn() -> Iterator[None]:
    churn = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.port_churn", "--held", "3000", "--rate", "3000"],
        stdout=subprocess.PIPE, preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        assert churn.stdout is not None and churn.stdout.readline() == b"ready\n"
        yield
    finally:
        churn.kill()
        churn.wait(10)


def start_stacks(tmp, n: int) -> list[str]:
    """Start and stop n stacks in a row; the errors of those that failed to start."""
    errors = []
    for i in range(n):
        stack = LocalStack(StackOptions(workdir=tmp / f"stack-{i}", sims=1, sim_args=FAST_SIM, model=MODEL, kv_events=True))
        try:
            with stack:
                # A port taken by another listener is no start error, but the request then goes astray.
                r = httpx.post(f"{stack.base_url}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
                if r.status_code != 200:
                    errors.append(f"stack {i}: answered {r.status_code}")
        except StackError as e:
            lines = str(e).splitlines()
            errors.append(f"stack {i}: {lines[0]} {' | '.join(line for line in lines if 'in use' in line.lower() or 'bind' in line.lower())}")
        except httpx.HTTPError as e:
            errors.append(f"stack {i}: {e!r}")
    return errors


def test_every_stack_starts_while_the_machine_churns_through_ports(tmp_path, port_churn):
    assert start_stacks(tmp_path, STACKS) == []
