"""Keeps the local stack's children running, so `epp up` survives the death of any of them.

A child that dies without having been stopped on purpose is reported (one line: which child, how it
ended, after how long) and started again with the same argv, so on the same ports (the stack holds
them). The delay doubles while it keeps dying soon after starting, up to a cap, and starts over once
it has run a while. A restarted child is reported again once it serves. Children stopped through the
stack's API (`ManagedProcess.stop`, `LocalStack.stop_epp`) stay stopped; a kill from outside is a
crash. A child that is alive but hung (SIGSTOP, a deadlock) is not the supervisor's to judge: Envoy's
health check routes around a hung EPP, the EPP's scraper around a hung endpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.datalayer.supervisor import Backoff

if TYPE_CHECKING:
    from extproc.devstack.stack import ManagedProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial: float = 0.2  # seconds before the first restart: short, the EPP's outage is the user's
    maximum: float = 10.0  # the cap of the doubling delay: a child that keeps dying is retried this often
    stable_after: float = 10.0  # a child that ran this long before it died starts over at `initial`
    start_timeout: float = 60.0  # a restarted child that does not serve by then is killed and retried


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def describe_exit(code: int) -> str:
    """`was killed by SIGKILL`, `exited with code 1`."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(slots=True)
class _Watch:
    """What the supervisor knows of one child."""

    started: float
    backoff: Backoff
    quick_exits: int = 0  # deaths in a row, each within `stable_after` of its start
    restart_at: float | None = None  # set while a restart is pending
    serving: bool = True  # the stack waited for the first start; a restart is watched until it serves
    restarts: int = 0
    died_at: float = 0.0


class ProcessSupervisor:
    """`poll()` looks at every child once: reports deaths, restarts those due, reports returns.
    `start()` polls from a thread until `stop()`."""

    def __init__(
        self,
        children: Callable[[], Iterable[ManagedProcess]],
        *,
        policy: RestartPolicy = RestartPolicy(),
        report: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ready: Callable[[str], bool] = http_ready,
    ) -> None:
        self.children = children
        self.policy = policy
        self.report = report or log.warning
        self.clock = clock
        self.ready = ready
        self._watches: dict[ManagedProcess, _Watch] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def restarts(self, proc: ManagedProcess) -> int:
        """How many times this child was restarted."""
        watch = self._watches.get(proc)
        return watch.restarts if watch else 0

    def poll(self) -> None:
        now = self.clock()
        current = [p for p in self.children() if p.wanted]
        for proc in current:
            watch = self._watches.get(proc)
            if watch is None:
                watch = self._watches[proc] = _Watch(now, Backoff(self.policy.initial, self.policy.maximum))
            code = proc.popen.poll()
            if code is None:
                if not watch.serving:
                    self._check_serving(proc, watch, now)
            elif watch.restart_at is None:
                self._on_exit(proc, watch, code, now)
            elif now >= watch.restart_at and proc.respawn():
                watch.restart_at = None
                watch.started = now
                watch.serving = not proc.ready_url
                watch.restarts += 1
        for gone in self._watches.keys() - set(current):  # stopped on purpose or dropped by the stack
            del self._watches[gone]

    def _on_exit(self, proc: ManagedProcess, watch: _Watch, code: int, now: float) -> None:
        ran = now - watch.started
        if ran >= self.policy.stable_after:
            watch.backoff.reset()
            watch.quick_exits = 0
        else:
            watch.quick_exits += 1
        delay = watch.backoff.next_delay()
        watch.restart_at = now + delay
        watch.died_at = now
        line = f"{proc.name} (pid {proc.popen.pid}) {describe_exit(code)} after {ran:.1f} s"
        if watch.quick_exits > 1:
            line += f", {watch.quick_exits} times in a row within {self.policy.stable_after:g} s of starting"
        if delay >= self.policy.maximum:
            line += f"; it keeps dying: retrying every {delay:g} s"
        else:
            line += f"; restarting it in {delay:g} s"
        if code >= 0 or watch.quick_exits > 1:
            line += f" (log: {proc.log_path})"
        self.report(line)

    def _check_serving(self, proc: ManagedProcess, watch: _Watch, now: float) -> None:
        if self.ready(proc.ready_url):
            watch.serving = True
            self.report(f"{proc.name} is back (pid {proc.popen.pid}): serving {now - watch.died_at:.1f} s after it died")
        elif now - watch.started > self.policy.start_timeout:
            self.report(f"{proc.name} (pid {proc.popen.pid}) does not serve {self.policy.start_timeout:g} s after its restart; killing it")
            proc.kill()

    # -- the thread ------------------------------------------------------------------------------
    def start(self, interval: float = 0.1) -> None:
        """Poll every `interval` seconds from a thread. Children it restarts get SIGTERM when that
        thread ends (the stack's parent-death signal follows the thread that forked), so it runs
        until `stop()`, which the stack calls just before it stops them anyway."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="stack-supervisor", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.poll()
            except Exception:  # never let one bad pass end supervision
                log.exception("stack supervisor: poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
