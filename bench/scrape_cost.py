"""What a /metrics scrape costs after hostile traffic: the exposition's size, the time to build it, and
the longest the event loop waits while a scrape is built off it (`EppMetrics.scrape`) or on it
(`EppMetrics.exposition`, as the EPP did before). No network: the metrics are fed as the Director
feeds them, one request per model name.
Run: python -m bench.scrape_cost [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Callable

from extproc.handlers.request_stream import Outcome
from extproc.handlers.usage import Usage
from extproc.observability.bounds import MAX_MODELS, MODEL_MAX
from extproc.observability.metrics import EppMetrics

OUTCOME = Outcome(status=200, streaming=True, usage=Usage(10, 5, 3), aborted=False, served=None, duration=0.2, first_byte=0.02)

SCENARIOS: dict[str, Callable[[], list[str]]] = {
    "one 1 MB model name": lambda: ["sim-model", "x" * 1_000_000],
    "ordinary names (200 x 40 chars)": lambda: [f"org-{i:03d}/lora-adapter-for-tenant-{i:05d}"[:40] for i in range(MAX_MODELS)],
    # the most bytes per label: every character 4 bytes of UTF-8, or a backslash the format doubles
    "hostile names, emoji (250 x 4,096 chars)": lambda: [f"{i:03d}" + "\U0001f600" * 4096 for i in range(MAX_MODELS + 50)],
    "hostile names, backslashes (250 x 4,096)": lambda: [f"{i:03d}" + "\\" * 4096 for i in range(MAX_MODELS + 50)],
}


def feed(names: list[str]) -> EppMetrics:
    m = EppMetrics("pool")
    for name in names:
        m.scheduled(name, 0.001)
        m.completed(name, OUTCOME, OUTCOME.usage)  # type: ignore[arg-type]
    return m


async def longest_stall(build: Callable[[], object], ticks: float = 0.001) -> tuple[float, float]:
    """(seconds the build took, the longest gap between 1 ms ticks of the loop meanwhile)."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(ticks)
            now = time.perf_counter()
            worst = max(worst, now - last - ticks)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    result = build()
    if asyncio.isfuture(result):
        await result
    took = time.perf_counter() - start
    done = True
    await task
    return took, worst


async def run(repeat: int) -> None:
    print(f"model label cap {MODEL_MAX} characters, {MAX_MODELS} distinct (model, target) pairs; median of {repeat}")
    print(f"{'scenario':42} {'size':>9} {'build':>9} {'stall, off the loop':>20} {'stall, on the loop':>19}")
    for name, make in SCENARIOS.items():
        m = feed(make())
        size = len(m.exposition())
        off = [await longest_stall(m.scrape) for _ in range(repeat)]
        on = [await longest_stall(m.exposition) for _ in range(repeat)]
        build = statistics.median(t for t, _ in on)
        stall_off = statistics.median(s for _, s in off)
        stall_on = statistics.median(s for _, s in on)
        print(f"{name:42} {size / 1e6:7.2f}MB {build * 1000:7.1f}ms {stall_off * 1000:18.1f}ms {stall_on * 1000:17.1f}ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    asyncio.run(run(ap.parse_args().repeat))


if __name__ == "__main__":
    main()
