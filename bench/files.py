"""What reading a large or hostile endpoints file costs the EPP: parse time, and how long a reload
holds the event loop (the longest gap seen by a task that wakes every millisecond).

`python -m bench.files [--quick]` (about 30 s, `--quick` about 15) parses a 1 MB endpoints file with
PyYAML's pure-Python safe loader, with libyaml's CSafeLoader and with pickers.config.safe_yaml, then
reloads a watched file (extproc.datalayer.endpoints_file) changed to each case while the ticker runs.
No network; the numbers are for one process on a shared machine, so read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.common import table
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import StaticFileDiscovery


def endpoints_text(size: int, *, start: int = 0) -> str:
    """A valid endpoints file of about `size` bytes: realistic entries (address, port, name, labels)."""
    lines = ["endpoints:"]
    total, i = 11, start
    while total < size:
        entry = (
            f"- address: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n  port: {8000 + i % 1000}\n  name: pod-{i}\n"
            f"  metricsPath: /metrics\n  labels:\n    app: vllm\n    zone: zone-{i % 3}"
        )
        lines.append(entry)
        total += len(entry) + 1
        i += 1
    return "\n".join(lines) + "\n"


def alias_bomb() -> str:
    names = "abcdefghi"
    levels = [f"&a [{', '.join(['lol'] * 9)}]"]
    levels += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    return f"- [{', '.join(levels)}]\n"


def best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def parse_times(text: str, repeat: int) -> list[list[str]]:
    rows = [["PyYAML safe_load (pure Python)", f"{best_of(1, lambda: yaml.safe_load(text)):.2f} s"]]
    if yaml.__with_libyaml__:
        rows.append(["PyYAML CSafeLoader", f"{best_of(repeat, lambda: yaml.load(text, Loader=yaml.CSafeLoader)):.2f} s"])
    try:
        from pickers.config import safe_yaml
    except ImportError:  # a tree from before safe_yaml: compare against it with the same script
        return rows
    rows.append(["pickers.config.safe_yaml.parse", f"{best_of(repeat, lambda: safe_yaml.parse(text, source='bench')):.2f} s"])
    return rows


async def reload_stall(path: Path, data: str | bytes, base: str) -> tuple[float, float, bool]:
    """Reload `path` changed from `base` to `data` with a 1 ms ticker running: (reload seconds,
    longest ticker gap in seconds, whether a new table was applied)."""
    path.write_text(base)
    discovery = StaticFileDiscovery(path, Datastore())
    discovery.load()
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)  # type: ignore[operator]
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    gaps.clear()
    start = time.perf_counter()
    applied = await discovery.poll_once()
    took = time.perf_counter() - start
    stop.set()
    await task
    return took, max(gaps, default=took), applied


async def reloads(workdir: Path, sizes: list[int], bomb: bool) -> list[list[str]]:
    path = workdir / "endpoints.yaml"
    base = endpoints_text(2_000, start=1_000_000)
    cases: list[tuple[str, str | bytes]] = [(f"valid, {n / 1e6:g} MB", endpoints_text(n)) for n in sizes]
    if bomb:
        cases.append((f"alias bomb ({len(alias_bomb())} bytes)", alias_bomb()))
    cases.append(("garbage (64 KiB of random bytes)", bytes(range(256)) * 256))
    rows = []
    for name, data in cases:
        took, gap, applied = await reload_stall(path, data, base)
        rows.append([name, f"{took:.2f} s", f"{gap * 1000:.0f} ms", "applied" if applied else "refused"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.files", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no 3 MB case")
    p.add_argument("--no-bomb", action="store_true", help="skip the alias bomb (a tree from before the limits hangs on it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the refused cases log errors: expected here
    text = endpoints_text(1_000_000)
    print(table(["1 MB endpoints file: parser", "parse time"], parse_times(text, 1 if args.quick else 3)))
    print()
    sizes = [1_000_000] if args.quick else [1_000_000, 3_000_000]
    with tempfile.TemporaryDirectory(prefix="bench-files-") as tmp:
        rows = asyncio.run(reloads(Path(tmp), sizes, bomb=not args.no_bomb))
    print(table(["endpoints file changed to", "reload", "longest event-loop gap", "table"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
