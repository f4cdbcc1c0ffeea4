"""Hostile files: `epp serve` given a bad file (an alias bomb, a file over the size limit, invalid
YAML) exits 2 at once with a message naming it, for each file it reads; and the same files written
into a running stack's watched endpoints file under load fail no request, keep the last good table,
and leave the EPP stopping promptly on SIGTERM."""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench import faults
from pickers.config.loader import DEFAULT_CONFIG_TEXT
from pickers.config.safe_yaml import MAX_FILE_BYTES
from tests.integration.conftest import make_stack


def alias_bomb() -> str:
    """The "billion laughs" as one list item: 9 levels, each repeating the one before 9 times; 9**9
    strings from 381 bytes. As an endpoints file its item is refused, and the old error message
    printed the item whole (gigabytes, on the event loop)."""
    names = "abcdefghi"
    levels = [f"&a [{', '.join(['lol'] * 9)}]"]
    levels += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    return f"- [{', '.join(levels)}]\n"


# A valid file of each kind, to pad past the size limit with a comment.
VALID = {
    "--endpoints": "endpoints:\n  - {address: 127.0.0.1, port: 8000}\n",
    "--config-file": DEFAULT_CONFIG_TEXT,
    "--objectives": "- {name: batch, priority: -1}\n",
    "--model-rewrites": "- targets: [{modelRewrite: other}]\n",
}
BAD: dict[str, tuple[Callable[[str], str], str]] = {
    "alias-bomb": (lambda flag: alias_bomb(), r"refused: aliases repeat more than 10,000 nodes \(a YAML alias bomb\?\)"),
    "too-big": (
        lambda flag: VALID[flag] + "#" + "x" * MAX_FILE_BYTES + "\n",
        r"refused: 4,19\d,\d{3} bytes; the limit is 4,194,304 bytes \(4 MiB\)",
    ),
    "invalid": (lambda flag: VALID[flag] + "oops: [\n", r"invalid YAML at line \d+, column \d+: "),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("flag", VALID)
def test_epp_serve_exits_2_at_once_on_a_bad_file_and_names_it(tmp_path, flag, case):
    text, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text(flag))
    argv = [
        sys.executable, "-m", "extproc.cli", "serve", "--bind-address", "127.0.0.1", "--grpc-port", "0",
        "--grpc-health-port", "0", "--metrics-port", "0", "--admin-port", "0", flag, str(path),
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"epp serve {flag} <{case}> was still running after 60 s")
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(rf"^epp: configuration error: {re.escape(str(path))}: {message}", done.stderr, re.M), done.stderr[-2000:]


# -- written into a running stack's watched endpoints file -----------------------------------------

LARGE_LABELS = 16_000  # x 2 endpoints x ~100 bytes: a valid 3 MB endpoints file


def _write_atomically(path: Path, data: str | bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)  # as kubelet swaps a ConfigMap: the poller never reads half a file


def _epp_log(s) -> str:  # type: ignore[no-untyped-def]
    return s.epp_proc.log_path.read_text(errors="replace")


def _names(s) -> list[str]:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"http://127.0.0.1:{s.epp_admin_port}/debug/endpoints", timeout=10) as r:
        return sorted(e["name"] for e in json.load(r)["endpoints"])


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:  # the admin port did not answer in time: the EPP is stalled
            pass
        time.sleep(0.1)
    return False


@pytest.mark.envoy
def test_hostile_edits_of_the_watched_endpoints_file_fail_no_request_and_keep_the_last_table(tmp_path):
    with make_stack(tmp_path, sims=2) as s:
        epp = s.epp_proc.popen
        # If parsing ever runs away again, fail this test rather than the machine (a bomb's repr
        # grows by gigabytes): 2 GiB of heap is ~15x what the EPP uses.
        resource.prlimit(epp.pid, resource.RLIMIT_DATA, (2 << 30, 2 << 30))
        path = s.endpoints_path
        assert path is not None
        entries = yaml.safe_load(path.read_text())["endpoints"]
        large = {"endpoints": [
            {**e, "name": f"large-{i}", "labels": {f"label-{j:05d}": "v" * 80 for j in range(LARGE_LABELS)}}
            for i, e in enumerate(entries)
        ]}  # fmt: skip
        large_text = yaml.safe_dump(large)
        assert 3_000_000 <= len(large_text) < MAX_FILE_BYTES
        garbage = random.Random(0).randbytes(64 * 1024)

        load = faults.LoadRun(s.listen_port).start()
        time.sleep(1.0)
        _write_atomically(path, alias_bomb())
        bomb_refused = _wait(lambda: "refused: aliases repeat" in _epp_log(s), 20)
        _write_atomically(path, large_text)
        large_applied = _wait(lambda: _names(s) == ["large-0", "large-1"], 30)
        _write_atomically(path, garbage)
        garbage_refused = _wait(lambda: "not UTF-8 text" in _epp_log(s), 20)
        time.sleep(1.0)
        answered = Counter(r.status for r in load.stop() if not math.isnan(r.end))  # status None: lost

        assert answered.total() > 200
        assert answered == {200: answered.total()}, answered
        assert bomb_refused and large_applied and garbage_refused, _epp_log(s)[-3000:]
        assert _names(s) == ["large-0", "large-1"]  # the last good table
        log = _epp_log(s)
        assert log.count("keeping the last endpoints") == 2, log[-3000:]  # one line per bad version

        assert epp.poll() is None
        stopping = time.monotonic()
        os.killpg(epp.pid, signal.SIGTERM)
        try:
            epp.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the EPP ignored SIGTERM for 10 s")
        assert time.monotonic() - stopping < 5
        assert epp.returncode == 0, _epp_log(s)[-3000:]
