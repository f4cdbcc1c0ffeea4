"""The Grafana dashboard in manifests/grafana loads and queries only metrics the EPP exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from extproc.handlers.request_stream import RequestStream
from pickers.framework.endpoint import Metrics
from tests.unit.test_observability import json_request, make, streamed_request
from tests.unit.test_protocol import send_request

DASHBOARD = Path(__file__).resolve().parents[2] / "manifests" / "grafana" / "llm-epp-dashboard.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_names() -> set[str]:
    """Every sample name the EPP's registry exposes after some traffic of each kind."""
    director, ds, metrics, _ = make()
    for ep in ds.candidates():  # a scraped pool: the pool means have samples
        ds.update_metrics(ep.address, Metrics(waiting=1, kv_usage=0.5, updated_at=time.monotonic()))
    streamed_request(director)
    json_request(director)
    json_request(director, status=500)
    send_request(RequestStream(director), b"{bad")
    return metrics.names()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords and label names left out)."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        following = e[m.end() :].lstrip()[:1]
        if following == "(" or m.group() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def targets(dashboard: dict) -> list[dict]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_has_the_grafana_shape(dashboard):
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["title"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"] and t["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_only_metrics_we_export(dashboard):
    exported = exported_names()
    used = set()
    for t in targets(dashboard):
        names = metric_names(t["expr"])
        assert names, t["expr"]
        used |= names
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            used |= metric_names(v["definition"].replace("label_values(", "").split(",")[0])
    assert used - exported == set()
    # and it shows every family we export, one way or another (llm-d's names of the pool means are the
    # same series as GIE's, which the dashboard shows)
    aliases = {"llm_d_epp_average_kv_cache_utilization": "inference_pool_average_kv_cache_utilization",
               "llm_d_epp_average_queue_size": "inference_pool_average_queue_size"}  # fmt: skip
    families = {aliases.get(f, f) for f in (re.sub(r"_(bucket|sum|count|total)$", "", n) for n in exported)}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families - shown == set()


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{m=~"$x"}[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("sum(rate(a_sum[5m])) / sum(rate(b_count[5m]))") == {"a_sum", "b_count"}
