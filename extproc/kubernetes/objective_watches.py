"""InferenceObjectives and InferenceModelRewrites of our pool, watched from the API server into the
ObjectiveStore and the RewriteStore (`inference.networking.x-k8s.io/v1alpha2`, manifests/crds/).

Only objects whose `poolRef` names our pool count (an InferenceModelRewrite without a poolRef applies to
every pool in the namespace); one that stops naming it is dropped. An object that does not decode is
skipped with a warning rather than stalling the watch. While the CRD is not installed the list fails
with 404 and the watch retries with backoff, so installing it later needs no restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi

from extproc.kubernetes.objects import InferenceModelRewrite, InferenceObjective, PoolRef
from extproc.kubernetes.watch import ListWatch
from extproc.requestcontrol.objectives import ObjectiveStore
from extproc.requestcontrol.rewrites import RewriteStore, Rule, Target

log = logging.getLogger(__name__)

OBJECTIVES_GROUP = "inference.networking.x-k8s.io"
OBJECTIVES_VERSION = "v1alpha2"
OBJECTIVES_PLURAL = "inferenceobjectives"
REWRITES_PLURAL = "inferencemodelrewrites"

_objective_decoder = msgspec.json.Decoder(InferenceObjective)
_rewrite_decoder = msgspec.json.Decoder(InferenceModelRewrite)


def _names_pool(ref: PoolRef | None, pool_name: str, pool_group: str) -> bool:
    if ref is None or not pool_name:
        return True  # no poolRef (rewrites), or no pool of ours to compare with (--endpoint-selector)
    return ref.name == pool_name and ref.group == pool_group and ref.kind == "InferencePool"


def rules_of(obj: InferenceModelRewrite) -> list[Rule]:
    rules = []
    for r in obj.spec.rules:
        models = tuple(m.model.value for m in r.matches if m.model is not None and m.model.value and m.model.type == "Exact")
        if r.matches and not models:
            continue  # matches only on kinds we do not know: never applies
        targets = tuple(Target(t.model_rewrite, 1 if t.weight is None else t.weight) for t in r.targets if t.model_rewrite)
        if targets:
            rules.append(Rule(models, targets))
    return rules


class _Handler:
    """A WatchHandler that decodes each object on its own and hands the ones for our pool to `put`."""

    def __init__(
        self,
        kind: str,
        decode: Callable[[msgspec.Raw], Any],
        pool_ref: Callable[[Any], PoolRef | None],
        *,
        pool_name: str,
        pool_group: str,
        replace: Callable[[dict[str, Any]], None],
        put: Callable[[Any], None],
        delete: Callable[[str], None],
    ) -> None:
        self.kind = kind
        self.decode = decode
        self.pool_ref = pool_ref
        self.pool_name = pool_name
        self.pool_group = pool_group
        self._replace = replace
        self._put = put
        self._delete = delete

    def _decoded(self, raw: msgspec.Raw) -> Any | None:
        try:
            return self.decode(raw)
        except msgspec.DecodeError as e:
            log.warning("%s: skipping an object that does not decode: %s", self.kind, e)
            return None

    def _ours(self, obj: Any) -> bool:
        return _names_pool(self.pool_ref(obj), self.pool_name, self.pool_group)

    def replace(self, items: list[msgspec.Raw]) -> None:
        objs = [o for o in map(self._decoded, items) if o is not None and self._ours(o)]
        self._replace({o.metadata.name: o for o in objs})

    def apply(self, event_type: str, raw: msgspec.Raw) -> None:
        obj = self._decoded(raw)
        if obj is None:
            return
        if event_type == "DELETED" or not self._ours(obj):
            self._delete(obj.metadata.name)
        else:
            self._put(obj)


class ObjectiveWatches:
    """The two list+watch loops; `objectives()` and `rewrites()` are run by the supervisor."""

    def __init__(
        self,
        api: ApiClient,
        objectives: ObjectiveStore,
        rewrites: RewriteStore,
        *,
        namespace: str,
        pool_name: str,
        pool_group: str,
        watch_timeout: tuple[int, int] = (300, 600),
    ) -> None:
        self.namespace = namespace
        custom = CustomObjectsApi(api)

        def lister(plural: str) -> Callable[..., Any]:
            async def list_call(**kw: object) -> object:
                return await custom.list_namespaced_custom_object(OBJECTIVES_GROUP, OBJECTIVES_VERSION, namespace, plural, **kw)

            return list_call

        def priority(o: InferenceObjective) -> int:
            return o.spec.priority or 0

        objective_handler = _Handler(
            "InferenceObjective", _objective_decoder.decode, lambda o: o.spec.pool_ref,
            pool_name=pool_name, pool_group=pool_group,
            replace=lambda objs: objectives.replace_watched({n: priority(o) for n, o in objs.items()}),
            put=lambda o: objectives.put_watched(o.metadata.name, priority(o)),
            delete=objectives.delete_watched,
        )  # fmt: skip
        rewrite_handler = _Handler(
            "InferenceModelRewrite", _rewrite_decoder.decode, lambda o: o.spec.pool_ref,
            pool_name=pool_name, pool_group=pool_group,
            replace=lambda objs: rewrites.replace_watched(
                {n: (o.metadata.creation_timestamp, rules_of(o)) for n, o in objs.items()}
            ),
            put=lambda o: rewrites.put_watched(o.metadata.name, o.metadata.creation_timestamp, rules_of(o)),
            delete=rewrites.delete_watched,
        )  # fmt: skip
        self.objective_watch = ListWatch(
            lister(OBJECTIVES_PLURAL), objective_handler, what=f"InferenceObjectives {namespace}", watch_timeout=watch_timeout
        )
        self.rewrite_watch = ListWatch(
            lister(REWRITES_PLURAL), rewrite_handler, what=f"InferenceModelRewrites {namespace}", watch_timeout=watch_timeout
        )

    async def objectives(self) -> None:
        await self.objective_watch.run()

    async def rewrites(self) -> None:
        await self.rewrite_watch.run()
