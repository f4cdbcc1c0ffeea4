"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it.

One replica holds the Lease and renews it every `retry_period`; the others retry as often and take it
over once it has not changed for `lease_duration` (measured on their own clock, so clock skew between
nodes does not matter). Writes carry the resourceVersion they read, so two candidates can never both
win: the loser gets 409 Conflict. A leader that cannot renew within `renew_deadline` (shorter than the
lease) steps down before anyone else may take over; one that stops cleanly hands the Lease back at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp
import msgspec
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api

from extproc.kubernetes.client import KubeApiError, read_body
from extproc.kubernetes.objects import Lease

log = logging.getLogger(__name__)

_lease_decoder = msgspec.json.Decoder(Lease)


def default_identity() -> str:
    """`<pod name or hostname>_<random>`: unique even when a restarted pod keeps its name."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_lease_name(pool_namespace: str, pool_name: str) -> str:
    """The Lease the reference picker uses for a pool, so mixed deployments contend for the same one."""
    return f"epp-{pool_namespace}-{pool_name}.gateway-api-inference-extension.sigs.k8s.io"


def _micro_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Campaigns for the Lease `namespace/name` until cancelled; `is_leader` says whether we hold it."""

    def __init__(
        self,
        api: ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError(
                f"need 0 < retry period ({retry_period}s) < renew deadline ({renew_deadline}s) "
                f"< lease duration ({lease_duration}s)"
            )
        self.api = CoordinationV1Api(api)
        self.name = name
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.is_leader = False
        self._observed: tuple[str | None, str | None] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0  # time.monotonic() when it last changed

    @property
    def what(self) -> str:
        return f"lease {self.namespace}/{self.name}"

    async def run(self) -> None:
        try:
            while True:
                while not await self.try_acquire_or_renew():
                    await asyncio.sleep(self.retry_period)
                self._set_leader(True)
                await self._renew_until_lost()
                self._set_leader(False)
        finally:
            if self.is_leader:
                self._set_leader(False)
                await asyncio.shield(self._release())

    async def _renew_until_lost(self) -> None:
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            if await self.try_acquire_or_renew():
                last_renew = time.monotonic()
            elif time.monotonic() - last_renew >= self.renew_deadline:
                log.warning("%s: could not renew for %.1fs; stepping down", self.what, self.renew_deadline)
                return

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        log.info("%s: %s %s leader", self.what, self.identity, "became" if leader else "is no longer")
        if self.on_change is not None:
            self.on_change(leader)

    async def _call(self, method: Any, *args: Any, what: str) -> Lease:
        # Bounded so that a hung request cannot keep a leader past its renew deadline.
        timeout = max(0.1, min(self.renew_deadline / 2, 10.0))
        resp = await method(*args, _preload_content=False, _request_timeout=timeout)
        return _lease_decoder.decode(await read_body(resp, what=what))

    def _body(self, lease: Lease | None, *, acquire_time: str, transitions: int, holder: str) -> dict[str, Any]:
        now = _micro_time(time.time())
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease.metadata.resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": max(1, math.ceil(self.lease_duration)),
                "acquireTime": acquire_time,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards. API failures count as not holding it."""
        now = _micro_time(time.time())
        try:
            try:
                lease = await self._call(self.api.read_namespaced_lease, self.name, self.namespace, what=f"get {self.what}")
            except KubeApiError as e:
                if e.status != 404:
                    raise
                body = self._body(None, acquire_time=now, transitions=0, holder=self.identity)
                await self._call(self.api.create_namespaced_lease, self.namespace, body, what=f"create {self.what}")
                return True
            spec = lease.spec
            seen = (spec.holder_identity, spec.renew_time)
            if seen != self._observed:
                self._observed, self._observed_at = seen, time.monotonic()
            if spec.holder_identity == self.identity:
                body = self._body(
                    lease, acquire_time=spec.acquire_time or now, transitions=spec.lease_transitions or 0, holder=self.identity
                )
            else:
                duration = spec.lease_duration_seconds or self.lease_duration
                if spec.holder_identity and time.monotonic() < self._observed_at + duration:
                    return False  # held by someone else, and alive
                body = self._body(lease, acquire_time=now, transitions=(spec.lease_transitions or 0) + 1, holder=self.identity)
            await self._call(self.api.replace_namespaced_lease, self.name, self.namespace, body, what=f"update {self.what}")
            return True
        except KubeApiError as e:
            if e.status == 409:
                log.debug("%s: lost a race (%s)", self.what, e)
            else:
                log.warning("%s: %s", self.what, e)
            return False
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            log.warning("%s: Kubernetes API unreachable (%s: %s)", self.what, type(e).__name__, e)
            return False

    async def _release(self) -> None:
        """Hand the Lease back (empty holder) so a standby takes over without waiting it out."""
        try:
            lease = await self._call(self.api.read_namespaced_lease, self.name, self.namespace, what=f"get {self.what}")
            if lease.spec.holder_identity != self.identity:
                return
            body = self._body(lease, acquire_time=lease.spec.acquire_time or _micro_time(time.time()),
                              transitions=lease.spec.lease_transitions or 0, holder="")  # fmt: skip
            body["spec"]["leaseDurationSeconds"] = 1
            await self._call(self.api.replace_namespaced_lease, self.name, self.namespace, body, what=f"release {self.what}")
            log.info("%s: released", self.what)
        except (KubeApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            log.warning("%s: could not release the lease (%s); it expires on its own", self.what, e)
