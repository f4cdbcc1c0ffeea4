"""Benchmark pictures: a PNG beside each printed table (TTFT distributions and throughput per
configuration). matplotlib is optional (`pip install -e '.[bench]'`); without it the benchmarks
print their tables and say that no picture was drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import percentile


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def latency_and_throughput_png(
    path: str | Path,
    title: str,
    latencies_s: Mapping[str, Sequence[float]],
    throughput: Mapping[str, float],
    *,
    latency_label: str = "time to first token",
    throughput_label: str = "output tokens / s",
) -> Path | None:
    """Left: each configuration's latency (e.g. TTFT) as a cumulative distribution (log time axis,
    p50/p90 marked). Right: its throughput as bars. Returns the file written, or None without matplotlib."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    names = list(latencies_s)
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(names):
        values = sorted(v * 1000 for v in latencies_s[name])
        if not values:
            continue
        n = len(values)
        color = colors[i % len(colors)]
        left.step(values, [(k + 1) / n for k in range(n)], where="post", color=color, linewidth=2, label=name)
        for q, style in ((0.5, ":"), (0.9, "--")):
            left.axvline(percentile(values, q * 100), color=color, linestyle=style, linewidth=1, alpha=0.7)
    left.set_xscale("log")
    left.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel(f"{latency_label} (ms, log scale)   dotted: p50, dashed: p90")
    left.set_ylabel("share of requests")
    left.set_ylim(0, 1.02)
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right", fontsize=9)
    left.set_title(f"{latency_label}: distribution")

    bars = right.bar(range(len(names)), [throughput.get(n, 0.0) for n in names], color=[colors[i % len(colors)] for i in range(len(names))])
    right.bar_label(bars, fmt="%.0f")
    right.set_xticks(range(len(names)), [_wrap(n) for n in names], fontsize=9)
    right.set_ylabel(throughput_label)
    right.set_title("throughput")
    right.grid(True, axis="y", alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _wrap(label: str, width: int = 16) -> str:
    words, lines, line = label.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def report(path: Path | None) -> str:
    if path is None:
        return "(no picture: matplotlib is not installed; pip install -e '.[bench]')"
    return f"picture: {path}"
