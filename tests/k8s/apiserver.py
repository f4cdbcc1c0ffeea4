"""A small Kubernetes API server stand-in for tests: pods, InferencePools, Leases, InferenceObjectives and
InferenceModelRewrites over real HTTP.

It keeps objects with real, increasing resourceVersions and a change log, so that lists, watches from
a resourceVersion (chunked JSON lines, label and field selectors, ADDED/MODIFIED/DELETED as the real
watch cache reports them when labels change), bookmarks and 410 Gone behave as the real API server's
do. Tests change objects with `put`/`delete` and break things with `compact`, `drop_watches` and
`stop`/`start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from extproc.devstack.ports import reserve_port

RESOURCES = {
    # plural: (path prefix before /namespaces, apiVersion, kind)
    "pods": ("/api/v1", "v1", "Pod"),
    "inferencepools": ("/apis/inference.networking.k8s.io/v1", "inference.networking.k8s.io/v1", "InferencePool"),
    "leases": ("/apis/coordination.k8s.io/v1", "coordination.k8s.io/v1", "Lease"),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1", "EndpointSlice"),
    "inferenceobjectives": (
        "/apis/inference.networking.x-k8s.io/v1alpha2", "inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"
    ),
    "inferencemodelrewrites": (
        "/apis/inference.networking.x-k8s.io/v1alpha2", "inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite"
    ),
}

_END = "end"  # finish the watch cleanly (as a server-side timeout does)
_DROP = "drop"  # cut the connection mid-stream


@dataclass(slots=True)
class Change:
    rv: int
    resource: str
    namespace: str
    name: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None  # None: deleted


@dataclass(slots=True, eq=False)
class _Watcher:
    resource: str
    namespace: str
    labels: dict[str, str]
    fields: dict[str, str]
    queue: asyncio.Queue[Change | str] = field(default_factory=asyncio.Queue)


def _parse_selector(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if part:
            k, _, v = part.partition("=")
            out[k.rstrip("=")] = v
    return out


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message}


class FakeApiServer:
    def __init__(self, *, bookmark_interval: float | None = 0.2) -> None:
        self.bookmark_interval = bookmark_interval
        # Held from here to `release()`, so a stop and start again (an API-server restart) always
        # gets the same port back (extproc/devstack/ports.py).
        self._reserved = reserve_port()
        self.port = self._reserved.port
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.changes: list[Change] = []
        self.compacted_rv = 0  # a watch from an older resourceVersion gets 410 Gone
        self.gone_as_http_status = False  # 410 as the HTTP status instead of an ERROR event
        self.watchers: set[_Watcher] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.fail_with: int | None = None  # answer every request with this status (e.g. 500)
        self.blocked_tokens: set[str] = set()  # clients cut off (a partition): 503 for their requests
        self.missing: set[str] = set()  # resources whose CRD is not installed: 404
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        for plural, (prefix, _, _) in RESOURCES.items():
            coll = f"{prefix}/namespaces/{{ns}}/{plural}"
            app.router.add_get(coll, self._collection_get)
            app.router.add_post(coll, self._create)
            app.router.add_get(coll + "/{name}", self._item_get)
            app.router.add_put(coll + "/{name}", self._replace)
            app.router.add_delete(coll + "/{name}", self._item_delete)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        """The API server goes away: every connection is cut and the port refuses new ones."""
        self.drop_watches()
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Give the port back (after the last `stop()`)."""
        self._reserved.close()

    def kubeconfig(self, path: str, *, token: str = "test-token") -> str:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": "default"}}],
            "current-context": "fake",
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        return path

    # -- what tests do ---------------------------------------------------------------------------
    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (the resourceVersion is the server's)."""
        obj = copy.deepcopy(obj)
        _, api_version, kind = RESOURCES[resource]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (resource, meta["namespace"], meta["name"])
        old = self.objects.get(key)
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        if old is not None:
            meta.setdefault("uid", old["metadata"].get("uid"))
        else:
            meta.setdefault("uid", f"uid-{self.rv}")
        self.objects[key] = obj
        self._record(Change(self.rv, resource, meta["namespace"], meta["name"], old, obj))
        return obj

    def delete(self, resource: str, name: str, namespace: str = "default") -> None:
        old = self.objects.pop((resource, namespace, name))
        self.rv += 1
        self._record(Change(self.rv, resource, namespace, name, old, None))

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.objects.get((resource, namespace, name))

    def compact(self) -> None:
        """Forget the change log: watches from any resourceVersion older than now get 410 Gone."""
        self.compacted_rv = self.rv
        self.changes.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection."""
        for w in list(self.watchers):
            w.queue.put_nowait(_DROP)

    def end_watches(self) -> None:
        """End every open watch cleanly, as the server's timeoutSeconds does."""
        for w in list(self.watchers):
            w.queue.put_nowait(_END)

    def count(self, method: str, resource: str, *, watch: bool | None = None) -> int:
        n = 0
        for m, path, query in self.requests:
            if m != method or f"/{resource}" not in path:
                continue
            is_watch = query.get("watch") in ("true", "1", "True")
            if watch is None or watch == is_watch:
                n += 1
        return n

    def _record(self, change: Change) -> None:
        self.changes.append(change)
        for w in list(self.watchers):
            if w.resource == change.resource and w.namespace == change.namespace:
                w.queue.put_nowait(change)

    # -- HTTP --------------------------------------------------------------------------------------
    def _resource(self, request: web.Request) -> str:
        for plural in RESOURCES:
            if f"/{plural}" in request.path:
                return plural
        raise web.HTTPNotFound()

    def _note(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path, dict(request.query)))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token in self.blocked_tokens:
            return web.json_response(_status(503, "ServiceUnavailable", "partitioned"), status=503)
        if self.fail_with is not None:
            return web.json_response(_status(self.fail_with, "InternalError", "injected failure"), status=self.fail_with)
        return None

    @staticmethod
    def _matches(obj: dict[str, Any] | None, labels: dict[str, str], fields: dict[str, str]) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        have = meta.get("labels") or {}
        if any(have.get(k) != v for k, v in labels.items()):
            return False
        for k, v in fields.items():
            if k == "metadata.name" and meta.get("name") != v:
                return False
            if k == "metadata.namespace" and meta.get("namespace") != v:
                return False
        return True

    async def _collection_get(self, request: web.Request) -> web.StreamResponse:
        if (failed := self._note(request)) is not None:
            return failed
        resource, ns = self._resource(request), request.match_info["ns"]
        if resource in self.missing:
            return web.json_response(_status(404, "NotFound", "the server could not find the requested resource"), status=404)
        labels = _parse_selector(request.query.get("labelSelector"))
        fields = _parse_selector(request.query.get("fieldSelector"))
        if request.query.get("watch") in ("true", "1", "True"):
            return await self._watch(request, resource, ns, labels, fields)
        _, api_version, kind = RESOURCES[resource]
        items = [
            o for (r, n, _), o in sorted(self.objects.items()) if r == resource and n == ns and self._matches(o, labels, fields)
        ]
        return web.json_response(
            {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
        )

    async def _watch(
        self, request: web.Request, resource: str, ns: str, labels: dict[str, str], fields: dict[str, str]
    ) -> web.StreamResponse:
        rv_text = request.query.get("resourceVersion") or ""
        since = int(rv_text) if rv_text.isdigit() else self.rv
        gone = _status(410, "Expired", f"too old resource version: {since} ({self.compacted_rv})")
        if since < self.compacted_rv and self.gone_as_http_status:
            return web.json_response(gone, status=410)
        watcher = _Watcher(resource, ns, labels, fields)
        backlog = [c for c in self.changes if c.resource == resource and c.namespace == ns and c.rv > since]
        self.watchers.add(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if since < self.compacted_rv:
                await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                await resp.write_eof()
                return resp
            for change in backlog:
                await self._send(resp, change, labels, fields)
            timeout = float(request.query.get("timeoutSeconds") or 3600)
            bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1", "True") and self.bookmark_interval
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval) if bookmarks and self.bookmark_interval else left
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    if bookmarks:
                        _, api_version, kind = RESOURCES[resource]
                        mark = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self.rv)}}
                        await resp.write(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
                    continue
                if item == _DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if item == _END:
                    break
                assert isinstance(item, Change)
                await self._send(resp, item, labels, fields)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        return resp

    async def _send(self, resp: web.StreamResponse, change: Change, labels: dict[str, str], fields: dict[str, str]) -> None:
        was, now = self._matches(change.old, labels, fields), self._matches(change.new, labels, fields)
        if now and not was:
            kind, obj = "ADDED", change.new
        elif now and was:
            kind, obj = "MODIFIED", change.new
        elif was:
            kind, obj = "DELETED", copy.deepcopy(change.new or change.old)
            assert obj is not None
            obj["metadata"]["resourceVersion"] = str(change.rv)
        else:
            return
        # Chunks split mid-line on purpose: a client must reassemble lines.
        data = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        await resp.write(data[: len(data) // 2])
        await resp.write(data[len(data) // 2 :])

    async def _item_get(self, request: web.Request) -> web.Response:
        if (failed := self._note(request)) is not None:
            return failed
        obj = self.get(self._resource(request), request.match_info["name"], request.match_info["ns"])
        if obj is None:
            return web.json_response(_status(404, "NotFound", f"{request.match_info['name']} not found"), status=404)
        return web.json_response(obj)

    async def _create(self, request: web.Request) -> web.Response:
        if (failed := self._note(request)) is not None:
            return failed
        resource, ns = self._resource(request), request.match_info["ns"]
        body = await request.json()
        name = body.get("metadata", {}).get("name", "")
        if self.get(resource, name, ns) is not None:
            return web.json_response(_status(409, "AlreadyExists", f"{name} already exists"), status=409)
        body.setdefault("metadata", {})["namespace"] = ns
        body["metadata"].pop("resourceVersion", None)
        return web.json_response(self.put(resource, body), status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        if (failed := self._note(request)) is not None:
            return failed
        resource, ns, name = self._resource(request), request.match_info["ns"], request.match_info["name"]
        body = await request.json()
        current = self.get(resource, name, ns)
        if current is None:
            return web.json_response(_status(404, "NotFound", f"{name} not found"), status=404)
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            return web.json_response(
                _status(409, "Conflict", "the object has been modified; please apply your changes to the latest version"),
                status=409,
            )
        body.setdefault("metadata", {}).update(namespace=ns, name=name)
        return web.json_response(self.put(resource, body))

    async def _item_delete(self, request: web.Request) -> web.Response:
        if (failed := self._note(request)) is not None:
            return failed
        resource, ns, name = self._resource(request), request.match_info["ns"], request.match_info["name"]
        if self.get(resource, name, ns) is None:
            return web.json_response(_status(404, "NotFound", f"{name} not found"), status=404)
        self.delete(resource, name, ns)
        return web.json_response(_status(200, "", "deleted") | {"status": "Success"})


@contextlib.asynccontextmanager
async def running_apiserver(**kw: Any):  # type: ignore[no-untyped-def]
    server = FakeApiServer(**kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        server.release()
