"""Kubernetes discovery: the pool is the Ready pods that an InferencePool (or a label selector given
on the command line) selects, one endpoint `podIP:port` per target port, named `<pod>-rank-<i>`: a
data-parallel rank, with `rank` i and a `dp_group` shared by the ranks that step together (dp_group_of).

`PodTable` is the pure part (pods in, EndpointSpecs out); `KubernetesDiscovery` wires it to list+watch
streams of the pool and of its pods, and pushes every change of the table to the datastore. While the
API server is unreachable the last known table stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi

from extproc.datalayer.datastore import Datastore
from extproc.kubernetes.objects import InferencePool, Pod
from extproc.kubernetes.watch import ListWatch
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.errors import ConfigError

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
LLMD_ACTIVE_PORTS_ANNOTATION = "llm-d.ai/active-ports"  # llm-d's newer name; wins over the GIE one
DP_GROUP_LABEL = "llm-epp/dp-group"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"

_pod_decoder = msgspec.json.Decoder(Pod)
_pool_decoder = msgspec.json.Decoder(InferencePool)


@dataclass(slots=True, frozen=True)
class PoolSpec:
    """What selects the pool's endpoints: pod labels that must all match, and the ports of each pod."""

    match_labels: tuple[tuple[str, str], ...]
    target_ports: tuple[int, ...]

    @classmethod
    def of(cls, match_labels: Mapping[str, str], target_ports: Iterable[int]) -> PoolSpec:
        return cls(tuple(sorted(match_labels.items())), tuple(target_ports))

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.match_labels)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels)


def parse_endpoint_selector(text: str) -> dict[str, str]:
    """`--endpoint-selector`: `key=value` pairs separated by commas, as the reference picker takes."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if key.endswith("="):  # `key==value` is accepted by kubectl; take it too
            key = key[:-1]
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value pairs separated by commas, got {text!r}", field="--endpoint-selector")
        labels[key.strip()] = value.strip()
    return labels


def parse_target_ports(text: str) -> tuple[int, ...]:
    """`--endpoint-target-ports`: port numbers separated by commas (1-8 of them, no repeats)."""
    ports: list[int] = []
    for part in text.split(","):
        p = part.strip()
        if not (p.isascii() and p.isdigit()) or not 1 <= int(p) <= 65535:
            raise ConfigError(f"expected port numbers 1-65535 separated by commas, got {text!r}", field="--endpoint-target-ports")
        if int(p) in ports:
            raise ConfigError(f"port {p} is listed twice", field="--endpoint-target-ports")
        ports.append(int(p))
    if not 1 <= len(ports) <= 8:
        raise ConfigError(f"expected 1 to 8 ports, got {len(ports)}", field="--endpoint-target-ports")
    return tuple(ports)


def active_ports(pod: Pod) -> frozenset[int] | None:
    """The ports the pod's active-ports annotation allows, or None when it has none (all ports).
    llm-d's `llm-d.ai/active-ports` is read first, then GIE's, as the llm-d router does."""
    annotations = pod.metadata.annotations
    raw = annotations.get(LLMD_ACTIVE_PORTS_ANNOTATION)
    if raw is None:
        raw = annotations.get(ACTIVE_PORTS_ANNOTATION)
    if raw is None:
        return None
    ports = set()
    for part in raw.split(","):
        p = part.strip()
        if p.isascii() and p.isdigit():
            ports.add(int(p))
    return frozenset(ports)


def dp_group_of(pod: Pod, target_ports: tuple[int, ...]) -> str:
    """The data-parallel group of a pod's endpoints: its `llm-epp/dp-group` label; else its
    LeaderWorkerSet group (`<namespace>/<lws name>/<group index>`: the leader and workers of one group
    run the ranks of one DP group); else, for a pool with several targetPorts (a pod serving several
    ranks), the pod itself (`<namespace>/<pod>`); else "" (a single-rank pod: no group)."""
    labels = pod.metadata.labels
    meta = pod.metadata
    group = labels.get(DP_GROUP_LABEL)
    if group:
        return group
    lws, index = labels.get(LWS_NAME_LABEL), labels.get(LWS_GROUP_INDEX_LABEL)
    if lws and index:
        return f"{meta.namespace}/{lws}/{index}"
    return f"{meta.namespace}/{meta.name}" if len(target_ports) > 1 else ""


def endpoints_for_pod(pod: Pod, target_ports: tuple[int, ...]) -> list[EndpointSpec]:
    """The endpoints a pod contributes: none unless it is Ready; one per (active) target port.

    The rank `i` is the port's index in the pool's targetPorts (llm-d's RankIndex), so neither a name
    nor a rank changes when the annotation narrows the ports.
    """
    if not pod.ready:
        return []
    allowed = active_ports(pod)
    ip, node_ip = pod.status.pod_ip, pod.status.host_ip
    host = f"[{ip}]" if ":" in ip else ip
    node = f"[{node_ip}]" if ":" in node_ip else node_ip
    labels = dict(pod.metadata.labels)
    group = dp_group_of(pod, target_ports)
    return [
        EndpointSpec(
            name=f"{pod.metadata.name}-rank-{i}", host=host, port=port, labels=labels,
            namespace=pod.metadata.namespace, rank=i, dp_group=group, pod=pod.metadata.name, node_address=node,
            hostname=pod.spec.hostname,
        )  # fmt: skip
        for i, port in enumerate(target_ports)
        if allowed is None or port in allowed
    ]


class PodTable:
    """The pods one pod watch currently sees, by name; `endpoints()` is the table they make."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.pods: dict[str, Pod] = {}

    def replace(self, pods: Iterable[Pod]) -> None:
        self.pods = {p.metadata.name: p for p in pods if self.spec.selects(p.metadata.labels)}

    def apply(self, event_type: str, pod: Pod) -> None:
        # The server filters by label, but a pod relabelled out of the selector may still arrive.
        if event_type == "DELETED" or not self.spec.selects(pod.metadata.labels):
            self.pods.pop(pod.metadata.name, None)
        else:
            self.pods[pod.metadata.name] = pod

    def endpoints(self, target_ports: tuple[int, ...] | None = None) -> list[EndpointSpec]:
        ports = self.spec.target_ports if target_ports is None else target_ports
        specs: list[EndpointSpec] = []
        for name in sorted(self.pods):
            specs.extend(endpoints_for_pod(self.pods[name], ports))
        return specs


class _PodHandler:
    def __init__(self, owner: KubernetesDiscovery, table: PodTable) -> None:
        self.owner = owner
        self.table = table

    def replace(self, items: list[msgspec.Raw]) -> None:
        self.table.replace(_pod_decoder.decode(raw) for raw in items)
        self.owner._publish(self.table)

    def apply(self, event_type: str, obj: msgspec.Raw) -> None:
        self.table.apply(event_type, _pod_decoder.decode(obj))
        self.owner._publish(self.table)


class _PoolHandler:
    def __init__(self, owner: KubernetesDiscovery) -> None:
        self.owner = owner

    def replace(self, items: list[msgspec.Raw]) -> None:
        pools = [_pool_decoder.decode(raw) for raw in items]
        self.owner._set_pool(pools[0] if pools else None)

    def apply(self, event_type: str, obj: msgspec.Raw) -> None:
        self.owner._set_pool(None if event_type == "DELETED" else _pool_decoder.decode(obj))


class KubernetesDiscovery:
    """Keeps the datastore's membership equal to the pool's Ready pods.

    Give `pool_name` to follow an InferencePool (its selector and targetPorts, which may change), or
    `spec` to select pods directly. `run()` runs until cancelled; the supervisor owns it.
    """

    def __init__(
        self,
        api: ApiClient,
        datastore: Datastore,
        *,
        namespace: str,
        pool_name: str | None = None,
        pool_group: str = POOL_GROUP,
        spec: PoolSpec | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
    ) -> None:
        if (pool_name is None) == (spec is None):
            raise ValueError("give exactly one of pool_name and spec")
        self.api = api
        self.datastore = datastore
        self.namespace = namespace
        self.pool_name = pool_name
        self.pool_group = pool_group
        self.watch_timeout = watch_timeout
        self.spec = spec  # the pool's current spec; None while the pool does not exist
        self.pool_watch: ListWatch | None = None
        self.pod_watch: ListWatch | None = None
        self._table: PodTable | None = None
        self._pod_task: asyncio.Task[None] | None = None
        self._published: list[EndpointSpec] | None = None
        self._failure: asyncio.Future[None] | None = None

    @property
    def what(self) -> str:
        if self.pool_name is not None:
            return f"InferencePool {self.namespace}/{self.pool_name}"
        return f"pods {self.namespace}/{self.spec.label_selector if self.spec else '?'}"

    async def run(self) -> None:
        self._failure = asyncio.get_running_loop().create_future()
        pool_task: asyncio.Task[None] | None = None
        try:
            if self.pool_name is None:
                assert self.spec is not None
                self._start_pod_watch(self.spec)
            else:
                custom = CustomObjectsApi(self.api)

                async def list_pools(**kw: object) -> object:
                    return await custom.list_namespaced_custom_object(
                        self.pool_group, POOL_VERSION, self.namespace, POOL_PLURAL, **kw
                    )

                self.pool_watch = ListWatch(
                    list_pools, _PoolHandler(self), what=self.what,
                    field_selector=f"metadata.name={self.pool_name}", watch_timeout=self.watch_timeout,
                )  # fmt: skip
                pool_task = self._spawn(self.pool_watch.run())
            await self._failure  # a watch only ends by a bug (API errors are retried inside): restart
        finally:
            tasks = [t for t in (pool_task, self._pod_task) if t is not None]
            self._cancel_pod_watch()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._child_done)
        return task

    def _child_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._failure is None or self._failure.done():
            return
        self._failure.set_exception(task.exception() or RuntimeError(f"{self.what}: a watch ended"))

    # -- the pool --------------------------------------------------------------------------------
    def _set_pool(self, pool: InferencePool | None) -> None:
        if pool is None:
            if self.spec is not None or self._published is None or self.datastore.synced:
                log.warning("%s does not exist (deleted?): endpoint table cleared", self.what)
            self.spec = None
            self._cancel_pod_watch()
            self.datastore.set_endpoints([])
            self.datastore.synced = False  # not ready until the pool exists again
            self._published = None
            return
        spec = PoolSpec.of(pool.spec.selector.match_labels, (p.number for p in pool.spec.target_ports))
        old, self.spec = self.spec, spec
        if old == spec and self._pod_task is not None:
            return
        if not spec.match_labels or not spec.target_ports:
            log.error("%s has an empty selector (every pod matches) or no targetPorts (no endpoints)", self.what)
        if old is None or old.match_labels != spec.match_labels or self._pod_task is None:
            log.info("%s: selector %s, ports %s; listing pods", self.what, spec.label_selector, spec.target_ports)
            self._start_pod_watch(spec)  # a new selector needs a new list; the old table stays until then
        else:
            log.info("%s: targetPorts now %s", self.what, spec.target_ports)
            assert self._table is not None
            self._table.spec = spec
            self._publish(self._table)

    # -- the pods ---------------------------------------------------------------------------------
    def _start_pod_watch(self, spec: PoolSpec) -> None:
        self._cancel_pod_watch()
        core = CoreV1Api(self.api)
        namespace = self.namespace

        async def list_pods(**kw: object) -> object:
            return await core.list_namespaced_pod(namespace, **kw)

        self._table = PodTable(spec)
        self.pod_watch = ListWatch(
            list_pods, _PodHandler(self, self._table), what=f"pods {namespace}/{spec.label_selector}",
            label_selector=spec.label_selector, watch_timeout=self.watch_timeout,
        )  # fmt: skip
        self._pod_task = self._spawn(self.pod_watch.run())

    def _cancel_pod_watch(self) -> None:
        if self._pod_task is not None:
            self._pod_task.cancel()
            self._pod_task = None
        self._table = None

    def _publish(self, table: PodTable) -> None:
        if table is not self._table:
            return  # a watch that was replaced; its news is stale
        specs = table.endpoints()
        if specs == self._published and self.datastore.synced:
            return
        first = self._published is None
        self._published = specs
        self.datastore.set_endpoints(specs)
        if first:
            log.info("%s synced: %d endpoints from %d pods", self.what, len(specs), len(table.pods))
