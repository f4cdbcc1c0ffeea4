"""What the benchmarks share: percentiles, goodput under an SLO, CPU time of a process, a plain-text table."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values; nan when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True, slots=True)
class Slo:
    """A latency objective one request meets or misses: its TTFT and its mean inter-token latency.

    The ITL of a request is the mean of its gaps between tokens after the first, (last - first) /
    (tokens - 1): the `itl` of inference-perf's goodput constraints, so a bound given here and in
    its `report.goodput.constraints` means the same thing. (A p90 of ~20 gaps would be the second
    largest gap, and chunks an HTTP read coalesces would read as 0 ms gaps; the mean is immune.)
    """

    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.itl_s > 0):
            raise ValueError(f"SLO bounds must be > 0, got TTFT {self.ttft_s} s, ITL {self.itl_s} s")

    def met(self, ttft: float | None, itl: float | None) -> bool:
        """A request without a first token (failed, cut off) misses; one without a second token has no
        gap that could be late, so only its TTFT counts."""
        return ttft is not None and ttft <= self.ttft_s and (itl is None or itl <= self.itl_s)

    def scaled(self, factor: float) -> Slo:
        return Slo(self.ttft_s * factor, self.itl_s * factor)

    def label(self) -> str:
        return f"TTFT<={1000 * self.ttft_s:g}ms ITL<={1000 * self.itl_s:g}ms"


def slo_from_flags(default: Slo, ttft_ms: float | None, itl_ms: float | None) -> Slo:
    """The default bounds, each replaced by its flag when given (milliseconds)."""
    return Slo(default.ttft_s if ttft_ms is None else ttft_ms / 1000, default.itl_s if itl_ms is None else itl_ms / 1000)


@dataclass(frozen=True, slots=True)
class Goodput:
    """Requests that met the SLO, per second of the run (inference-perf's `request_goodput`)."""

    slo: Slo
    good: int
    total: int
    ttft_met: int  # attainment of each bound on its own, to tell which one binds
    itl_met: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.good / self.seconds if self.seconds > 0 else math.nan

    @property
    def share(self) -> float:
        return self.good / self.total if self.total else math.nan


def goodput(requests: Iterable[tuple[float | None, float | None]], slo: Slo, seconds: float) -> Goodput:
    """Goodput of (ttft, itl) pairs, one per request sent (failed ones as (None, None)), over `seconds`."""
    good = total = ttft_met = itl_met = 0
    for ttft, itl in requests:
        total += 1
        ttft_ok = ttft is not None and ttft <= slo.ttft_s
        itl_ok = ttft is not None and (itl is None or itl <= slo.itl_s)
        ttft_met += ttft_ok
        itl_met += itl_ok
        good += slo.met(ttft, itl)
    return Goodput(slo, good, total, ttft_met, itl_met, seconds)


def max_over_fair(counts: Iterable[int], endpoints: int) -> float:
    """The busiest endpoint's share of the requests over its fair share (1/endpoints); 1.0 is even."""
    counts = list(counts)
    total = sum(counts)
    if not total or endpoints <= 0:
        return math.nan
    return max(counts) / total * endpoints


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; the fields we want come after its ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15 of proc(5)


def ratio(value: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}x"


def goodput_ratio(value: float, base: float) -> str:
    """Like ratio, but a baseline that met the SLO for no request at all still compares: "inf"."""
    if base == 0 and value > 0:
        return "inf"
    return ratio(value, base)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, one space-padded line per row."""
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def machine_cpu_seconds() -> float:
    """CPU seconds all cores spent busy since boot (every process, ours or not), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4] if len(fields) > 4 else 0
    return (sum(fields[:8]) - idle - iowait) / _TICKS  # user..softirq+steal; guest is already in user
