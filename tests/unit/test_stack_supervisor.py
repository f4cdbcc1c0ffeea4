"""The local stack's process supervisor (extproc/devstack/supervisor.py) with real short-lived
processes and a hand-driven clock: what is reported, when a child is restarted, what is left alone.
The same supervisor under `epp up`, with Envoy and the EPP, is tests/integration/test_up.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.devstack.stack import ManagedProcess
from extproc.devstack.supervisor import ProcessSupervisor, RestartPolicy, describe_exit

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

SLEEP = ["sleep", "60"]
# exits with code 3 when told (SIGUSR1), once its trap is set (it touches its ready file): a child
# that exited before the supervisor first met it would make the reported run time a race
FAIL_READY = Path(tempfile.gettempdir()) / f"llm-epp-fail-child-{os.getpid()}"
FAIL = ["sh", "-c", 'trap "exit 3" USR1; touch "$0"; while :; do sleep 0.02; done', str(FAIL_READY)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, tmp: Path, argv: list[str], ready_url: str = "") -> None:
        log = tmp / "child.log"
        self.proc = ManagedProcess("sim-0", subprocess.Popen(argv, start_new_session=True), log, ready_url=ready_url)
        self.clock = Clock()
        self.lines: list[str] = []
        self.serving = False
        self.sup = ProcessSupervisor(
            lambda: [self.proc], report=self.lines.append, clock=self.clock, ready=lambda url: self.serving,
        )  # fmt: skip
        self.sup.poll()  # the supervisor meets the child

    def at(self, t: float) -> None:
        """Poll with the clock `t` seconds past its start."""
        self.clock.now = 100.0 + t
        self.sup.poll()

    def die(self) -> int:
        """The child dies: SLEEP is killed from outside, FAIL exits by itself. Returns its pid once gone."""
        pid = self.proc.popen.pid
        if self.proc.popen.args == SLEEP:
            self.proc.kill()
        else:
            deadline = time.monotonic() + 10
            while not FAIL_READY.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            FAIL_READY.unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
        self.proc.popen.wait(10)
        return pid

    def stop(self) -> None:
        self.proc.stop(timeout=5)


@pytest.fixture
def harness(tmp_path) -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.stop()


def make(harness: list[Harness], tmp: Path, argv: list[str], ready_url: str = "") -> Harness:
    h = Harness(tmp, argv, ready_url)
    harness.append(h)
    return h


def delays(lines: list[str]) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(r"(?:restarting it in|retrying every) ([\d.]+) s", line))]


def test_a_killed_child_is_reported_with_its_signal(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP)
    pid = h.die()
    h.at(5.0)
    assert h.lines == [f"sim-0 (pid {pid}) was killed by SIGKILL after 5.0 s; restarting it in 0.2 s"]


def test_a_child_that_exits_is_reported_with_its_code_and_its_log(tmp_path, harness):
    h = make(harness, tmp_path, FAIL)
    pid = h.die()
    h.at(1.0)
    assert h.lines == [f"sim-0 (pid {pid}) exited with code 3 after 1.0 s; restarting it in 0.2 s (log: {tmp_path / 'child.log'})"]


def test_a_dead_child_is_restarted_once_its_delay_is_over(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP)
    old = h.die()
    h.at(5.0)
    h.at(5.1)
    assert h.proc.popen.pid == old
    h.at(5.2)
    assert h.proc.popen.pid != old
    assert h.proc.popen.poll() is None
    assert h.proc.popen.args == SLEEP
    assert h.sup.restarts(h.proc) == 1


def test_a_child_that_keeps_dying_quickly_is_retried_slower_up_to_the_cap(tmp_path, harness):
    h = make(harness, tmp_path, FAIL)
    t = 0.0
    for _ in range(9):
        h.die()
        h.at(t)  # the death is seen
        t += delays(h.lines)[-1] + 0.01
        h.at(t)  # the restart is due
    assert delays(h.lines) == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert "3 times in a row within 10 s of starting" in h.lines[2]
    assert "it keeps dying: retrying every 10 s" in h.lines[-1]
    assert h.sup.restarts(h.proc) == 9


def test_a_child_that_ran_a_while_before_dying_starts_over_at_the_first_delay(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP)
    t = 0.0
    for _ in range(3):  # three quick deaths: the delay has grown to 0.8 s
        h.die()
        h.at(t)
        t += delays(h.lines)[-1] + 0.01
        h.at(t)
    h.die()
    h.at(t + 30.0)  # this run lasted 30 s
    assert delays(h.lines) == [0.2, 0.4, 0.8, 0.2]
    assert "in a row" not in h.lines[-1]


def test_a_child_stopped_on_purpose_is_not_restarted(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP)
    old = h.proc.popen.pid
    h.proc.stop(timeout=5)
    for t in (1.0, 20.0, 60.0):
        h.at(t)
    assert h.lines == []
    assert h.proc.popen.pid == old and h.proc.popen.poll() is not None


def test_a_restarted_child_is_reported_back_once_it_serves(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP, ready_url="http://127.0.0.1:1/health")
    h.die()
    h.at(1.0)
    h.at(1.2)  # restarted
    h.at(1.5)
    assert len(h.lines) == 1  # not serving yet: nothing to say
    h.serving = True
    h.at(2.5)
    assert h.lines[-1] == f"sim-0 is back (pid {h.proc.popen.pid}): serving 1.5 s after it died"


def test_a_restarted_child_that_never_serves_is_killed_and_tried_again(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP, ready_url="http://127.0.0.1:1/health")
    h.die()
    h.at(1.0)
    h.at(1.2)  # restarted; it never serves
    stuck = h.proc.popen.pid
    h.at(1.2 + RestartPolicy().start_timeout + 1)
    assert h.lines[-1] == f"sim-0 (pid {stuck}) does not serve 60 s after its restart; killing it"
    h.proc.popen.wait(10)
    h.at(1.2 + RestartPolicy().start_timeout + 2)
    assert f"sim-0 (pid {stuck}) was killed by SIGKILL" in h.lines[-1]


def test_a_stopped_but_living_child_is_left_alone(tmp_path, harness):
    h = make(harness, tmp_path, SLEEP)
    pid = h.proc.popen.pid
    h.proc.kill(signal.SIGSTOP)
    try:
        h.at(30.0)
        assert h.lines == []
        assert h.proc.popen.pid == pid
    finally:
        h.proc.kill(signal.SIGCONT)


@pytest.mark.parametrize(("code", "text"), [(-9, "was killed by SIGKILL"), (-15, "was killed by SIGTERM"), (0, "exited with code 0"), (2, "exited with code 2")])
def test_exits_are_described_as_a_person_reads_them(code, text):
    assert describe_exit(code) == text
