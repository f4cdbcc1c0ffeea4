"""Live views of a running EPP, as JSON over HTTP (`--admin-port`, on 127.0.0.1 unless configured):

    /debug/endpoints   each endpoint's state: role, data-parallel rank and group, health, scraped load,
                       in-flight, prefix blocks held, the latency model's fitted values (`latency`:
                       pickers.latency.model)
    /debug/config      the effective scheduling profiles, the serve options and the config serving
                       (`config_reload`: its source, sha256, load time and the last reload error)
    /debug/decisions   the most recent routing decisions (newest last), with scores when explaining
    /debug/runtime     process numbers for soak checks: RSS, asyncio tasks, open ext_proc streams,
                       in-flight requests and tokens, prefix index size and bound
    /debug/flowcontrol flow control's queues: per band its requests, bytes, bounds, policies and
                       largest flows; saturation, outcome counts, eviction ({"enabled": false} when off)

`epp status` reads them. Built on demand from the datastore, the prefix index and the Director.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from extproc.datalayer.datastore import Datastore
from extproc.requestcontrol.director import Director
from pickers.framework.endpoint import ROLE_LABEL
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel


def endpoints_view(
    datastore: Datastore,
    prefix_index: ApproxPrefixIndex | None,
    precise: Mapping[str, Any] | None = None,
    latency: LatencyModel | None = None,
) -> list[dict[str, Any]]:
    """`precise`: plugin name -> precise-prefix-cache-scorer; each endpoint then also shows the blocks
    each precise index holds for it (`precise_prefix_blocks`, by plugin name). `latency`: the model
    whose fits each endpoint shows (`latency`)."""
    now = time.monotonic()
    out = []
    for ep in datastore.candidates():
        m = ep.metrics
        age = ep.metrics_age(now)
        stale = datastore.is_stale(ep, now)
        out.append({
            "name": ep.name,
            "address": ep.address,
            "role": ep.labels.get(ROLE_LABEL, ""),
            "rank": ep.spec.rank,  # index among its pod's ranks (targetPorts index)
            "dp_group": ep.spec.dp_group,  # "": not a rank of a data-parallel group
            "healthy": ep.scrape_error is None and not stale,
            "stale": stale,
            "scrape_error": ep.scrape_error,
            "last_scrape_age_s": None if math.isinf(age) else round(age, 3),
            "waiting": m.waiting,
            "running": m.running,
            "kv_usage": m.kv_usage,
            "in_flight": ep.in_flight,
            "in_flight_tokens": ep.in_flight_tokens,
            "prefix_blocks": prefix_index.blocks_of(ep.address) if prefix_index is not None else 0,
            "num_gpu_blocks": m.num_gpu_blocks,
            "running_lora_adapters": sorted(m.running_lora_adapters),
            # /v1/models (a models-data-source): models and LoRA adapters with their base; null: not fetched
            "served_models": None if ep.served_models is None else [
                {"id": s.id, "parent": s.parent} for s in ep.served_models.models
            ],
        })  # fmt: skip
        if ep.spec.namespace:
            out[-1]["namespace"] = ep.spec.namespace
        if m.pool_queue is not None:  # a peer cluster (multicluster-metrics-extractor): its pool means, unrounded
            out[-1]["pool_queue"] = m.pool_queue
            out[-1]["pool_kv_usage"] = m.pool_kv_usage
        if ep.attributes:
            # scalar attributes (custom metrics, GPUUtilization) and how old their producer's last value is
            times = ep.attributes_updated_at
            out[-1]["attributes"] = [
                {"attribute": k.name, "producer": k.producer, "value": v,
                 "age_s": round(now - times[k.producer], 3) if k.producer in times else None}
                for k, v in sorted(ep.attributes.items())
            ]  # fmt: skip
        if precise:
            out[-1]["precise_prefix_blocks"] = {name: p.index.blocks_of(ep.address) for name, p in precise.items()}
        if latency is not None:
            out[-1]["latency"] = latency.view(ep)
    return out


def _plugin(p: object, **extra: object) -> dict[str, object]:
    return {"type": getattr(p, "type", type(p).__name__), "name": getattr(p, "name", ""), **extra}


def scheduling_view(scheduler: Scheduler) -> dict[str, Any]:
    handler = scheduler.handler
    return {
        "profile_handler": _plugin(handler) if handler is not None else None,
        "explain_scores": scheduler.explain,
        "profiles": [
            {
                "name": name,
                "filters": [_plugin(f) for f in prof.filters],
                "scorers": [_plugin(ws.scorer, weight=ws.weight) for ws in prof.scorers],
                "picker": _plugin(prof.picker),
            }
            for name, prof in scheduler.profiles.items()
        ],
    }


def decisions_view(director: Director, limit: int | None = None) -> list[dict[str, Any]]:
    items = list(director.decisions)
    if limit is not None:
        items = items[-limit:] if limit > 0 else []
    return [
        {"time": t, "request_id": rid, "model": model, "chosen": dest.split(",") if dest else [], "profile": profile,
         "scores": scores, "rules": list(rules), "error": error}
        for t, rid, model, dest, profile, scores, rules, error in items
    ]  # fmt: skip


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` value in KiB (VmRSS, VmHWM); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def runtime_view(
    datastore: Datastore, prefix_index: ApproxPrefixIndex | None, extra: Callable[[], Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Cheap numbers (no walk over requests) that must return to their idle values after load."""
    eps = datastore.candidates()
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop (called outside the server)
        tasks = 0
    return {
        "rss_kib": _status_kib("VmRSS"),
        "rss_peak_kib": _status_kib("VmHWM"),
        "asyncio_tasks": tasks,
        "in_flight": sum(ep.in_flight for ep in eps),
        "in_flight_tokens": sum(ep.in_flight_tokens for ep in eps),
        "prefix_index_size": prefix_index.size() if prefix_index is not None else 0,
        "prefix_index_bound": prefix_index.bound() if prefix_index is not None else 0,
        **(extra() if extra is not None else {}),
    }


def options_view(opts: object) -> dict[str, Any]:
    """The serve options as plain JSON (nested dataclasses too)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(opts):  # type: ignore[arg-type]
        v = getattr(opts, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = options_view(v)
        elif isinstance(v, Mapping):
            v = dict(v)
        elif not isinstance(v, (str, int, float, bool, type(None), list, tuple)):
            v = str(v)
        out[f.name] = v
    return out


def admin_app(
    datastore: Datastore,
    prefix_index: ApproxPrefixIndex | None,
    director: Director,
    config: Mapping[str, Any],
    runtime: Callable[[], Mapping[str, Any]] | None = None,
    config_state: Callable[[], Mapping[str, Any]] | None = None,
    flow_control: Callable[[], Mapping[str, Any]] | None = None,
    latency: LatencyModel | None = None,
) -> web.Application:
    async def endpoints(request: web.Request) -> web.Response:
        from pickers.plugins.scorer.affinity.precise_prefix import precise_indexes

        precise = precise_indexes(director.scheduler.plugins)
        return web.json_response({"endpoints": endpoints_view(datastore, prefix_index, precise, latency)})

    async def config_handler(request: web.Request) -> web.Response:
        state = {"config_reload": config_state()} if config_state is not None else {}
        return web.json_response({**config, **state, "scheduling": scheduling_view(director.scheduler)}, dumps=_dumps)

    async def decisions(request: web.Request) -> web.Response:
        try:
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        return web.json_response({"decisions": decisions_view(director, limit)})

    async def runtime_handler(request: web.Request) -> web.Response:
        return web.json_response(runtime_view(datastore, prefix_index, runtime))

    async def flow_control_handler(request: web.Request) -> web.Response:
        return web.json_response(flow_control() if flow_control is not None else {"enabled": False}, dumps=_dumps)

    async def index(request: web.Request) -> web.Response:
        return web.json_response({"views": ["/debug/endpoints", "/debug/config", "/debug/decisions", "/debug/runtime", "/debug/flowcontrol"]})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/debug/endpoints", endpoints)
    app.router.add_get("/debug/config", config_handler)
    app.router.add_get("/debug/decisions", decisions)
    app.router.add_get("/debug/runtime", runtime_handler)
    app.router.add_get("/debug/flowcontrol", flow_control_handler)
    return app


def _dumps(obj: object) -> str:
    return json.dumps(obj, default=str)
