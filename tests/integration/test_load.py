"""Load through the real stack (Envoy + EPP + simulators), marked slow (`pytest -m slow
tests/integration/test_load.py`, or `make test-all`): 2,000 streaming requests held open at once,
and a soak of short requests with random prompts that watches the EPP's memory and tasks.
Both are bounded in count and time and stay on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import string
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from bench.http1 import ParseError, Parser, closed_loop, request_bytes
from tests.integration.conftest import MODEL, make_stack

pytestmark = [pytest.mark.slow, pytest.mark.envoy]

STREAMS = 2_000
# Each simulator step costs (8 ms + 0.1 ms x batch) x time scale: with ~500 sequences per simulator
# and --time-scale 20 a step is ~1.2 s, so 8 tokens keep every stream open ~10 s while the 2,000
# streams ramp up, and the token chunks (each one an ext_proc message) stay near 1,500/s.
HOLD_SIM = ("--time-scale", "20", "--max-num-seqs", "1000")
HOLD_TOKENS = 8


def _raise_fd_limit(need: int) -> None:
    """Client sockets here, downstream + upstream sockets in Envoy: children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need // 2:
        pytest.skip(f"needs about {need // 2} file descriptors, the hard limit is {hard}")


def runtime(s) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.epp_admin_port}/debug/runtime", timeout=10) as r:
        return json.loads(r.read())


def envoy_counters(s) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/stats", timeout=10) as r:
        out = {}
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out


EXT_PROC_ERRORS = ("streams_failed", "failure_mode_allowed", "message_timeouts", "spurious_msgs_received", "rejected_header_mutations")


def assert_no_envoy_errors(counters: dict[str, int]) -> None:
    bad = {
        k: v
        for k, v in counters.items()
        if v
        and (
            k.endswith(("upstream_rq_pending_overflow", "upstream_cx_overflow", "upstream_rq_5xx", "upstream_rq_timeout"))
            or k.endswith(("downstream_rq_5xx", "downstream_rq_4xx"))
            or (".ext_proc." in k and k.rsplit(".", 1)[1] in EXT_PROC_ERRORS)
        )
    }
    assert not bad, bad


def wait_idle(s, idle_tasks: int, timeout: float = 20.0) -> dict:
    """The EPP's counters back at their idle values (the last reading, for the message)."""
    deadline = time.monotonic() + timeout
    while True:
        rt = runtime(s)
        if rt["active_streams"] == 0 and rt["in_flight"] == 0 and rt["in_flight_tokens"] == 0 and rt["asyncio_tasks"] <= idle_tasks:
            return rt
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout:.0f}s (idle tasks {idle_tasks}): {rt}")
        time.sleep(0.2)


def idle_tasks(s) -> int:
    """The EPP's asyncio task count at rest: the least of a few readings (scrapes come and go)."""
    readings = []
    for _ in range(5):
        readings.append(runtime(s)["asyncio_tasks"])
        time.sleep(0.2)
    return min(readings)


# -- 2,000 concurrent streams ---------------------------------------------------------------------


@dataclass
class Streams:
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    incomplete: int = 0
    peak_active: int = 0
    ramp_s: float = 0.0  # until the EPP held its peak
    wall_s: float = 0.0


async def hold_streams(s, n: int, timeout: float = 180.0) -> Streams:
    """Open `n` streaming requests at once (one connection each), read each to its end."""
    loop = asyncio.get_running_loop()
    res = Streams()
    host = f"127.0.0.1:{s.listen_port}"

    async def one(i: int) -> None:
        body = json.dumps({
            "model": MODEL, "prompt": f"stream {i}: " + "hold the line " * 4, "max_tokens": HOLD_TOKENS,
            "stream": True, "stream_options": {"include_usage": True},
        }).encode()  # fmt: skip
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.listen_port)
            writer.write(request_bytes("POST", "/v1/completions", host, body, {"content-type": "application/json", "connection": "close"}))
            parser = Parser()
            msgs = []
            while not msgs:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed before the response ended")
                msgs = parser.feed(data)
            msg = msgs[0]
            res.statuses[msg.status] = res.statuses.get(msg.status, 0) + 1
            events = [line[6:] for line in msg.body.decode().splitlines() if line.startswith("data: ")]
            if msg.status == 200 and not (len(events) >= 3 and events[-1] == "[DONE]" and json.loads(events[-2]).get("usage")):
                res.incomplete += 1
        except (OSError, ParseError, ValueError) as e:
            res.errors.append(f"{type(e).__name__}: {e}")
        finally:
            if writer is not None:
                writer.close()

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            active = (await loop.run_in_executor(None, runtime, s))["active_streams"]
            if active > res.peak_active:
                res.peak_active, res.ramp_s = active, loop.time() - t0
            await asyncio.sleep(0.25)

    t0 = loop.time()
    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
    res.wall_s = loop.time() - t0
    done.set()
    await watcher
    return res


@pytest.mark.timeout(300)
def test_2000_concurrent_streams_are_held_through_envoy_without_errors(tmp_path):
    _raise_fd_limit(4 * STREAMS + 2000)
    with make_stack(tmp_path, sims=4, sim_args=HOLD_SIM) as s:
        idle = idle_tasks(s)
        res = asyncio.run(hold_streams(s, STREAMS))
        print(f"\n{STREAMS} streams: peak {res.peak_active} open ext_proc streams after {res.ramp_s:.1f}s, all done in {res.wall_s:.1f}s")
        assert not res.errors, (len(res.errors), res.errors[:5])
        assert res.statuses == {200: STREAMS}
        assert res.incomplete == 0  # every stream ended with its usage chunk and [DONE]
        assert res.peak_active >= 0.95 * STREAMS, res  # held at once, not one after another
        rt = wait_idle(s, idle)
        print(f"after: {rt}")
        assert_no_envoy_errors(envoy_counters(s))


# -- soak -----------------------------------------------------------------------------------------

SOAK_REQUESTS = 40_000
SOAK_SECONDS = 180.0
SAMPLE_S = 3.0


def soak_request(rng: random.Random, host: str) -> bytes:
    alphabet = string.ascii_letters + " "
    prompt = "".join(rng.choices(alphabet, k=rng.randint(100, 1200)))
    payload: dict = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(1, 4)}
    if rng.random() < 0.25:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return request_bytes("POST", "/v1/completions", host, json.dumps(payload).encode(), {"content-type": "application/json"})


@pytest.mark.timeout(300)  # the load stops itself after SOAK_SECONDS
def test_soak_through_envoy_keeps_the_epp_bounded(tmp_path):
    with make_stack(tmp_path, sims=4) as s:
        idle = idle_tasks(s)
        rng = random.Random(11)
        host = f"127.0.0.1:{s.listen_port}"
        samples: list[tuple[float, dict]] = []

        async def run():
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            make = lambda: soak_request(rng, host)  # noqa: E731
            load = asyncio.create_task(
                closed_loop("127.0.0.1", s.listen_port, make, concurrency=32, seconds=SOAK_SECONDS, max_requests=SOAK_REQUESTS)
            )
            while not load.done():
                samples.append((loop.time() - t0, await loop.run_in_executor(None, runtime, s)))
                await asyncio.wait([load], timeout=SAMPLE_S)
            return load.result()

        res = asyncio.run(run())
        end = wait_idle(s, idle)
        samples.append((samples[-1][0] + SAMPLE_S, end))
        rss = [(t, rt["rss_kib"] / 1024) for t, rt in samples]
        third = len(rss) // 3
        print(f"\nsoak: {res.ok} ok of {sum(res.statuses.values())} in {res.wall_s:.0f}s ({res.rate:.0f}/s), errors {dict(res.errors)}")
        print("RSS MiB: " + " ".join(f"{t:.0f}s:{m:.1f}" for t, m in rss))
        print(
            f"prefix index {end['prefix_index_size']}/{end['prefix_index_bound']}, tasks idle {idle} end {end['asyncio_tasks']}, "
            f"peak RSS {end['rss_peak_kib'] / 1024:.1f} MiB"
        )
        assert not res.errors and set(res.statuses) == {200}, (res.statuses, res.errors)
        assert res.ok >= 20_000, res.ok  # 40k take ~2.5 minutes on 2 shared cores; the time bound stops it earlier
        # RSS levels off: the last third of the run may grow the EPP by a few MiB at most.
        last_third_growth = rss[-1][1] - rss[-third - 1][1]
        assert last_third_growth < 8, rss
        assert all(rt["prefix_index_size"] <= rt["prefix_index_bound"] for _, rt in samples)
        assert end["prefix_index_size"] > 0.9 * end["prefix_index_bound"]  # it reached its bound and stayed there
        assert_no_envoy_errors(envoy_counters(s))
