"""The Kubernetes objects llm-epp reads, as typed structs decoded once from the API's JSON.

Only the fields we use are declared; the rest of each object is ignored by the decoder. Names follow
the API's JSON (camelCase) through `rename="camel"`.
"""

from __future__ import annotations

import msgspec


class ObjectMeta(msgspec.Struct, rename="camel", frozen=True):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    deletion_timestamp: str | None = None
    creation_timestamp: str = ""


class PodCondition(msgspec.Struct, frozen=True):
    type: str
    status: str


class PodStatus(msgspec.Struct, rename="camel", frozen=True):
    pod_ip: str = msgspec.field(default="", name="podIP")
    host_ip: str = msgspec.field(default="", name="hostIP")  # the node's: where a DaemonSet exporter listens
    conditions: list[PodCondition] = []


class PodSpec(msgspec.Struct, frozen=True):
    hostname: str = ""  # set by StatefulSets and LeaderWorkerSets (the pod's name), or by hand


class Pod(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    @property
    def ready(self) -> bool:
        """Serving: Ready, has an IP, and is not being deleted."""
        return (
            self.metadata.deletion_timestamp is None
            and bool(self.status.pod_ip)
            and any(c.type == "Ready" and c.status == "True" for c in self.status.conditions)
        )


class LabelSelector(msgspec.Struct, rename="camel", frozen=True):
    match_labels: dict[str, str] = {}


class Port(msgspec.Struct, frozen=True):
    number: int


class InferencePoolSpec(msgspec.Struct, rename="camel", frozen=True):
    selector: LabelSelector = LabelSelector()
    target_ports: list[Port] = []


class InferencePool(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferencePoolSpec = InferencePoolSpec()


class PoolRef(msgspec.Struct, frozen=True):
    name: str = ""
    group: str = "inference.networking.k8s.io"
    kind: str = "InferencePool"


class InferenceObjectiveSpec(msgspec.Struct, rename="camel", frozen=True):
    priority: int | None = None  # None: 0
    pool_ref: PoolRef = PoolRef()


class InferenceObjective(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferenceObjectiveSpec = InferenceObjectiveSpec()


class ModelMatch(msgspec.Struct, frozen=True):
    value: str = ""
    type: str = "Exact"


class RewriteMatch(msgspec.Struct, frozen=True):
    model: ModelMatch | None = None


class RewriteTarget(msgspec.Struct, rename="camel", frozen=True):
    model_rewrite: str = ""
    weight: int | None = None  # None: 1


class RewriteRule(msgspec.Struct, frozen=True):
    matches: list[RewriteMatch] = []
    targets: list[RewriteTarget] = []


class InferenceModelRewriteSpec(msgspec.Struct, rename="camel", frozen=True):
    pool_ref: PoolRef | None = None  # None: applies to every pool in the namespace
    rules: list[RewriteRule] = []


class InferenceModelRewrite(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: InferenceModelRewriteSpec = InferenceModelRewriteSpec()


class LeaseSpec(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True):
    holder_identity: str | None = None
    lease_duration_seconds: int | None = None
    acquire_time: str | None = None
    renew_time: str | None = None
    lease_transitions: int | None = None


class Lease(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: LeaseSpec = LeaseSpec()


class Status(msgspec.Struct, frozen=True):
    """The API's error object (a failed request's body, or the object of a watch ERROR event)."""

    code: int = 0
    reason: str = ""
    message: str = ""


class ListMeta(msgspec.Struct, rename="camel", frozen=True):
    resource_version: str = ""


class RawList(msgspec.Struct, frozen=True):
    metadata: ListMeta = ListMeta()
    items: list[msgspec.Raw] = []


class RawEvent(msgspec.Struct, frozen=True):
    type: str
    object: msgspec.Raw


class ResourceVersionOnly(msgspec.Struct, frozen=True):
    metadata: ListMeta = ListMeta()


_list_decoder = msgspec.json.Decoder(RawList)
_event_decoder = msgspec.json.Decoder(RawEvent)
_status_decoder = msgspec.json.Decoder(Status)
_rv_decoder = msgspec.json.Decoder(ResourceVersionOnly)


def decode_list(data: bytes) -> RawList:
    return _list_decoder.decode(data)


def decode_event(line: bytes) -> RawEvent:
    return _event_decoder.decode(line)


def decode_status(data: bytes | msgspec.Raw) -> Status:
    try:
        return _status_decoder.decode(data)
    except msgspec.DecodeError:
        return Status(message=bytes(data)[:200].decode("utf-8", "replace"))


def resource_version_of(raw: msgspec.Raw) -> str:
    return _rv_decoder.decode(raw).metadata.resource_version
