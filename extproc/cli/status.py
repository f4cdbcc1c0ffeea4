"""`epp status`: a running EPP's config, endpoint table, the latency model's fits, flow control's
queues (when on) and recent decisions, read from its /debug/ views."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any


def fetch(url: str, path: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
        return json.loads(r.read())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def endpoint_table(endpoints: Sequence[dict[str, Any]]) -> str:
    """One line per endpoint; the RANK and DP GROUP columns only when some endpoint is a
    data-parallel rank (an EPP older than them sends neither)."""
    ranked = any(ep.get("rank") or ep.get("dp_group") for ep in endpoints)
    header = ["NAME", "ADDRESS", "ROLE", *(["RANK", "DP GROUP"] if ranked else []), "HEALTH", "QUEUE", "RUNNING", "KV",
              "IN-FLIGHT", "TOKENS", "PREFIX BLOCKS", "SCRAPED"]  # fmt: skip
    rows = []
    for ep in endpoints:
        health = "ok" if ep["healthy"] else ("stale" if ep["stale"] else "error")
        if ep.get("scrape_error"):
            health += f" ({ep['scrape_error'][:40]})"
        age = ep.get("last_scrape_age_s")
        dp = [str(ep.get("rank", 0)), ep.get("dp_group") or "-"] if ranked else []
        rows.append([
            ep["name"] or "-", ep["address"], ep["role"] or "-", *dp, health, str(ep["waiting"]), str(ep["running"]),
            f"{100 * ep['kv_usage']:.0f}%", str(ep["in_flight"]), str(ep["in_flight_tokens"]), str(ep["prefix_blocks"]),
            "never" if age is None else f"{age:.1f}s ago",
        ])  # fmt: skip
    return _table(header, rows)


def latency_table(endpoints: Sequence[dict[str, Any]]) -> str:
    """The latency model per endpoint (/debug/endpoints' `latency`): where its numbers come from, how
    many responses taught it, the fitted rates, and how far its predictions were from what came."""
    header = ["NAME", "FIT", "SAMPLES", "PREFILL TOK/S", "TTFT BASE", "TTFT/RUNNING", "TPOT BASE", "TPOT/RUNNING", "TTFT ERROR", "BIAS"]
    rows = []
    for ep in endpoints:
        lat = ep.get("latency")
        if not lat:
            continue
        rows.append([
            ep["name"] or ep["address"], lat["source"], f"{lat['samples']}/{lat['tpot_samples']}",
            f"{lat['prefill_tokens_per_s']:.0f}", f"{lat['ttft_overhead_ms']:.1f}ms", f"{lat['ttft_ms_per_running']:.2f}ms",
            f"{lat['tpot_base_ms']:.1f}ms", f"{lat['tpot_ms_per_running']:.3f}ms",
            f"{lat['ttft_error_ms']:.0f}ms" if lat["samples"] else "-", f"{lat['ttft_bias_ms']:+.0f}ms" if lat["samples"] else "-",
        ])  # fmt: skip
    return _table(header, rows)


def attribute_table(endpoints: Sequence[dict[str, Any]]) -> str:
    """Each endpoint's scalar attributes (/debug/endpoints' `attributes`: custom metrics, GPUUtilization)."""
    header = ["NAME", "ATTRIBUTE", "PRODUCER", "VALUE", "UPDATED"]
    rows = []
    for ep in endpoints:
        for a in ep.get("attributes") or ():
            age = a.get("age_s")
            rows.append([ep["name"] or ep["address"], a["attribute"], a["producer"] or "-", f"{a['value']:.4g}",
                         "-" if age is None else f"{age:.1f}s ago"])  # fmt: skip
    return _table(header, rows)


def decision_table(decisions: Sequence[dict[str, Any]]) -> str:
    header = ["TIME", "REQUEST ID", "MODEL", "PROFILE", "CHOSEN", "TOP SCORES"]
    rows = []
    for d in decisions:
        chosen = ",".join(d["chosen"]) if d["chosen"] else f"rejected: {d['error']}"
        rows.append([
            time.strftime("%H:%M:%S", time.localtime(d["time"])), d["request_id"][:36], d["model"][:30] or "-",
            d["profile"] or "-", chosen, _top_scores(d.get("scores")),
        ])  # fmt: skip
    return _table(header, rows)


def flow_control_table(fc: dict[str, Any]) -> str:
    """One line per band (highest priority first), then the totals."""
    header = ["PRIORITY", "QUEUED", "BYTES", "MAX", "FLOWS", "FAIRNESS", "ORDERING", "LARGEST FLOWS"]
    rows = []
    for b in fc.get("bands", []):
        largest = " ".join(f"{f['fairness_id'][:24]}={f['requests']}" for f in b.get("largest_flows", [])[:3])
        rows.append([
            str(b["priority"]), str(b["requests"]), str(b["bytes"]), str(b["max_requests"]), str(b["flows"]),
            b["fairness"]["type"], b["ordering"]["type"], largest,
        ])  # fmt: skip
    return _table(header, rows)


def _top_scores(scores: dict[str, dict[str, float]] | None) -> str:
    if not scores:
        return ""
    totals = next((v for k, v in scores.items() if k == "total" or k.endswith("/total")), None)
    if not totals:
        return ""
    best = sorted(totals.items(), key=lambda kv: -kv[1])[:3]
    return " ".join(f"{addr}={s:.2f}" for addr, s in best)


def peers_table(peers: dict[str, Any]) -> str:
    """Active-active replicas (/debug/runtime's `peers`): each peer this replica pushes to, and what it heard."""
    rows = [[addr, "self" if p["self"] else "yes" if p["connected"] else "no", f"{p['for_s']:.1f}s", p["error"] or "-"]
            for addr, p in sorted(peers["peers"].items())]  # fmt: skip
    head = (f"replica {peers['replica_id']}: {peers['journal_entries']} picks journalled, {peers['records_sent']} sent, "
            f"{peers['records_applied']} applied from {len(peers['inbound'])} peer(s), {peers['records_dropped']} dropped")  # fmt: skip
    return head + "\n" + _table(["PEER", "CONNECTED", "FOR", "LAST ERROR"], rows)


def config_line(state: dict[str, Any] | None) -> str:
    """The config serving and its last reload error (/debug/config's `config_reload`)."""
    if not state:
        return "config: unknown (an EPP without /debug/config's config_reload)"
    if "loaded_at" not in state:
        return f"config: {state.get('source', '?')} (reload: {state.get('watch', 'off')})"
    loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["loaded_at"]))
    reloads = state.get("reloads") or {}
    line = (
        f"config: {state['source']} (sha256 {str(state.get('sha256', ''))[:12]}, loaded {loaded}, watched every "
        f"{state.get('watch_interval_s', 0):g}s; reloads: {reloads.get('success', 0)} applied, {reloads.get('error', 0)} failed)"
    )
    if state.get("last_error"):
        at = time.strftime("%H:%M:%S", time.localtime(state["last_error_at"])) if state.get("last_error_at") else "?"
        line += f"\nlast reload error ({at}; the config above still serves): {state['last_error']}"
    return line


def show_status(url: str, *, decisions: int = 10, raw: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        endpoints = fetch(url, "/debug/endpoints")["endpoints"]
        recent = fetch(url, f"/debug/decisions?limit={decisions}")["decisions"]
        config = fetch(url, "/debug/config").get("config_reload")
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"epp status: cannot read {url}/debug/: {e} (is the EPP running with --admin-port?)", file=sys.stderr)
        return 1
    try:
        fc = fetch(url, "/debug/flowcontrol")
    except (urllib.error.URLError, OSError, ValueError):  # an EPP from before flow control
        fc = {"enabled": False}
    try:
        peers = fetch(url, "/debug/runtime").get("peers")
    except (urllib.error.URLError, OSError, ValueError):
        peers = None
    if raw:
        print(json.dumps({"config": config, "endpoints": endpoints, "flow_control": fc, "peers": peers, "decisions": recent}, indent=2), file=out)
        return 0
    print(config_line(config), file=out)
    healthy = sum(1 for ep in endpoints if ep["healthy"])
    print(f"endpoints: {len(endpoints)} ({healthy} healthy)", file=out)
    print(endpoint_table(endpoints), file=out)
    if any(ep.get("latency") for ep in endpoints):
        print("\nlatency model (FIT: own / peer / prior; SAMPLES: TTFT/TPOT responses; ERROR: mean |predicted - observed| TTFT):", file=out)
        print(latency_table(endpoints), file=out)
    if any(ep.get("attributes") for ep in endpoints):
        print("\nendpoint attributes:", file=out)
        print(attribute_table(endpoints), file=out)
    if fc.get("enabled"):
        print(f"\nflow control: {fc['requests']} queued ({fc['bytes']} bytes), saturation {fc['saturation']:.2f}"
              f"{', pool empty' if fc.get('pool_empty') else ''}{', shutting down' if fc.get('closed') else ''}", file=out)  # fmt: skip
        print(flow_control_table(fc), file=out)
    if peers:
        print("\nactive-active peers:", file=out)
        print(peers_table(peers), file=out)
    print(f"\nrecent decisions (newest last, {len(recent)} shown):", file=out)
    print(decision_table(recent) if recent else "  none yet", file=out)
    return 0
