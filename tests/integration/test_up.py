"""`epp up` itself, run as a user runs it (bench.faults.UpRun): it survives the death of its children
(each reported and restarted on the same ports, Envoy staying up), traffic keeps flowing with
--fail-open while the EPP is gone, and Ctrl-C or SIGTERM stops every process it started. Then the
same supervision through the LocalStack API the tests and benchmarks use: what is stopped on
purpose stays stopped."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from bench import faults
from extproc.devstack.ports import reserve_port
from tests.integration.conftest import make_stack

pytestmark = [pytest.mark.envoy, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children found through /proc")]
LOAD_S = 3.0


def _post(port: int) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": faults.MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)


def test_fail_open_keeps_traffic_flowing_while_a_killed_epp_is_restarted(tmp_path):
    res = faults.up_fault(tmp_path, fault="epp-kill", fail_open=True, body_mode="BUFFERED", seconds=LOAD_S)
    assert res.sent > 200
    assert (res.failed, res.lost) == (0, 0), res
    assert res.routed_s < 10.0, res  # restarted (0.2 s + its start) and seen healthy by Envoy (1 s checks)
    assert any(re.fullmatch(r"epp \(pid \d+\) was killed by SIGKILL after [\d.]+ s; restarting it in 0.2 s", r) for r in res.reports), res.reports
    assert any(r.startswith("epp is back") for r in res.reports), res.reports


def test_a_killed_simulator_is_restarted_on_its_port_and_served_again(tmp_path):
    res = faults.up_fault(tmp_path, fault="sim-kill", seconds=LOAD_S)
    assert res.routed_s < 10.0, res  # a 200 from the same address, so the same port
    assert any(re.match(r"sim-0 \(pid \d+\) was killed by SIGKILL", r) for r in res.reports), res.reports


def test_a_killed_envoy_is_restarted_on_its_port(tmp_path):
    with faults.UpRun(tmp_path, sims=1) as up:
        old = up.send("envoy", signal.SIGKILL)
        up.wait_back("envoy", old)
        assert _post(up.port).status_code == 200
        assert any(re.match(r"envoy \(pid \d+\) was killed by SIGKILL", r) for r in up.reports())


@pytest.mark.parametrize(
    ("sig", "sigint_ignored"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["ctrl-c", "sigterm", "ctrl-c-started-by-a-script"],  # the last: `epp up &` in a shell without job control
)
def test_stopping_epp_up_stops_every_child(tmp_path, sig, sigint_ignored):
    with faults.UpRun(tmp_path, sims=1, sigint_ignored=sigint_ignored) as up:
        assert len(up.children()) == 3  # a simulator, the EPP, Envoy
        assert up.stop(sig) == 0  # raises if a child outlived it
        assert "stopping ..." in up.output()


def test_a_taken_port_is_a_clear_error(tmp_path):
    with reserve_port() as r:
        taken = socket.socket()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", r.port))
        taken.listen()
        with taken:
            out = subprocess.run(
                [sys.executable, "-m", "extproc.cli", "up", "--port", str(r.port), "--workdir", str(tmp_path)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
    assert out.returncode == 1
    assert f"epp up: port {r.port} on 127.0.0.1 is not available (already in use)" in out.stderr
    assert "Traceback" not in out.stderr


# -- the LocalStack API under supervision ---------------------------------------------------------


def _until(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_supervised_stack_restarts_a_killed_epp_on_its_ports(tmp_path):
    with make_stack(tmp_path, sims=1) as s:
        lines: list[str] = []
        s.supervise(report=lines.append)
        epp = s.epp_proc
        assert epp is not None
        old = epp.popen.pid
        epp.kill()
        assert _until(lambda: any(line.startswith("epp is back") for line in lines)), lines
        assert s.epp_proc is epp and epp.popen.pid != old
        assert _until(lambda: _post(s.listen_port).status_code == 200)  # Envoy reaches it on the same port


def test_a_supervised_stack_leaves_an_epp_stopped_on_purpose_stopped(tmp_path):
    with make_stack(tmp_path, sims=1) as s:
        lines: list[str] = []
        s.supervise(report=lines.append)
        s.stop_epp()
        time.sleep(1.5)  # past the first restart delays (0.2 s, 0.4 s, 0.8 s)
        assert lines == [] and s.epp_proc is None
        s.start_epp()
        assert _until(lambda: _post(s.listen_port).status_code == 200)
