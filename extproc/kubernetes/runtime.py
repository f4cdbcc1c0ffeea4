"""What `epp serve` runs when it talks to Kubernetes: pool discovery from the API server, the pool's
InferenceObjectives and InferenceModelRewrites and, with `--ha-enable-leader-election`, a Lease elector. `ready()` is the EPP's readiness: the pool is synced,
and this replica is the leader when leader election is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kubernetes_asyncio.client import ApiClient

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.supervisor import Supervisor
from extproc.kubernetes.client import default_namespace, make_api_client
from extproc.kubernetes.leader import LeaseElector, default_lease_name
from extproc.kubernetes.objective_watches import ObjectiveWatches
from extproc.kubernetes.pool_discovery import (
    POOL_GROUP,
    KubernetesDiscovery,
    PoolSpec,
    parse_endpoint_selector,
    parse_target_ports,
)
from extproc.requestcontrol.objectives import ObjectiveStore
from extproc.requestcontrol.rewrites import RewriteStore
from pickers.framework.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class KubernetesOptions:
    """The Kubernetes flags of `epp serve`, checked by `validate()`."""

    kubeconfig: str | None = None
    pool_name: str = ""  # follow this InferencePool ...
    pool_namespace: str = ""  # default: $NAMESPACE, else the pod's namespace, else `default`
    pool_group: str = POOL_GROUP
    endpoint_selector: str = ""  # ... or select pods directly
    endpoint_target_ports: str = ""
    leader_election: bool = False
    lease_name: str = ""  # default: the reference picker's name for the pool
    lease_namespace: str = ""  # default: the pool's namespace
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    watch_objectives: bool = True  # InferenceObjectives and InferenceModelRewrites, when discovering

    @property
    def discovers(self) -> bool:
        return bool(self.pool_name or self.endpoint_selector)

    @property
    def namespace(self) -> str:
        return self.pool_namespace or default_namespace()

    def pool_spec(self) -> PoolSpec | None:
        """The pod selection given on the command line (None when following a pool). Raises ConfigError."""
        if self.endpoint_selector and self.pool_name:
            raise ConfigError("give either --pool-name or --endpoint-selector, not both", field="--endpoint-selector")
        if bool(self.endpoint_selector) != bool(self.endpoint_target_ports):
            raise ConfigError(
                "--endpoint-selector and --endpoint-target-ports go together", field="--endpoint-target-ports"
            )
        if not self.endpoint_selector:
            return None
        return PoolSpec.of(parse_endpoint_selector(self.endpoint_selector), parse_target_ports(self.endpoint_target_ports))

    def validate(self) -> None:
        self.pool_spec()
        if self.leader_election and not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ConfigError(
                "expected --leader-election-retry-period < --leader-election-renew-deadline "
                "< --leader-election-lease-duration",
                field="--leader-election-renew-deadline",
            )


class KubernetesRuntime:
    """Owns the API client and the Kubernetes tasks of one EPP; the supervisor runs the tasks."""

    def __init__(
        self,
        opts: KubernetesOptions,
        datastore: Datastore,
        *,
        objectives: ObjectiveStore | None = None,
        rewrites: RewriteStore | None = None,
    ) -> None:
        opts.validate()
        self.opts = opts
        self.datastore = datastore
        self.objectives = objectives
        self.rewrites = rewrites
        self.api: ApiClient | None = None
        self.discovery: KubernetesDiscovery | None = None
        self.objective_watches: ObjectiveWatches | None = None
        self.elector: LeaseElector | None = None

    async def start(self, supervisor: Supervisor) -> None:
        opts = self.opts
        self.api = await make_api_client(opts.kubeconfig)
        namespace = opts.namespace
        if opts.discovers:
            spec = opts.pool_spec()
            self.discovery = KubernetesDiscovery(
                self.api, self.datastore, namespace=namespace,
                pool_name=None if spec is not None else opts.pool_name, pool_group=opts.pool_group, spec=spec,
            )  # fmt: skip
            supervisor.start("kubernetes-discovery", self.discovery.run)
            log.info("discovering endpoints from the Kubernetes API: %s", self.discovery.what)
            if opts.watch_objectives and self.objectives is not None and self.rewrites is not None:
                # Optional CRDs: they never hold up readiness, and a missing one is retried quietly.
                self.objective_watches = ObjectiveWatches(
                    self.api, self.objectives, self.rewrites,
                    namespace=namespace, pool_name=opts.pool_name, pool_group=opts.pool_group,
                )  # fmt: skip
                supervisor.start("inference-objectives", self.objective_watches.objectives)
                supervisor.start("inference-model-rewrites", self.objective_watches.rewrites)
        if opts.leader_election:
            self.elector = LeaseElector(
                self.api,
                name=opts.lease_name or default_lease_name(namespace, opts.pool_name or "llm-epp"),
                namespace=opts.lease_namespace or namespace,
                lease_duration=opts.lease_duration,
                renew_deadline=opts.renew_deadline,
                retry_period=opts.retry_period,
            )
            supervisor.start("leader-election", self.elector.run)
            log.info("leader election on %s as %s", self.elector.what, self.elector.identity)

    def ready(self) -> bool:
        if self.discovery is not None and not self.datastore.synced:
            return False
        return self.elector is None or self.elector.is_leader

    async def close(self) -> None:
        """After the supervisor has stopped the tasks (the elector has released its Lease)."""
        if self.api is not None:
            await self.api.close()
            self.api = None
