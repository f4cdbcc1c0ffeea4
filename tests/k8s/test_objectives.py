"""InferenceObjectives and InferenceModelRewrites of our pool, watched from the API-server stand-in over
real HTTP with the real client: the stores follow objects as they are added, changed and deleted."""

from __future__ import annotations

import random
from typing import Any

import pytest

from extproc.kubernetes.objective_watches import ObjectiveWatches
from extproc.requestcontrol.objectives import ObjectiveStore
from extproc.requestcontrol.rewrites import RewriteStore
from tests.k8s.conftest import eventually


def objective(name: str, priority: int | None, pool: str = "pool") -> dict[str, Any]:
    spec: dict[str, Any] = {"poolRef": {"name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


def rewrite(name: str, model: str, targets: dict[str, int], *, pool: str | None = "pool", created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rules": [
            {"matches": [{"model": {"type": "Exact", "value": model}}],
             "targets": [{"modelRewrite": t, "weight": w} for t, w in targets.items()]},
        ]
    }  # fmt: skip
    if pool is not None:
        spec["poolRef"] = {"name": pool}
    return {"metadata": {"name": name, "namespace": "default", "creationTimestamp": created}, "spec": spec}


@pytest.fixture
def stores():
    return ObjectiveStore({"from-file": -5}), RewriteStore(rng=random.Random(0))


@pytest.fixture
def watch(api, stores, tasks):
    def start(pool_name: str = "pool") -> ObjectiveWatches:
        objectives, rewrites = stores
        w = ObjectiveWatches(
            api, objectives, rewrites, namespace="default", pool_name=pool_name,
            pool_group="inference.networking.k8s.io", watch_timeout=(30, 30),
        )  # fmt: skip
        tasks(w.objectives())
        tasks(w.rewrites())
        return w

    return start


async def test_objectives_of_our_pool_are_added_changed_and_deleted(apiserver, watch, stores):
    objectives, _ = stores
    apiserver.put("inferenceobjectives", objective("batch", -1))
    apiserver.put("inferenceobjectives", objective("elsewhere", -9, pool="another-pool"))
    w = watch()
    await eventually(lambda: objectives.priority("batch") == -1)
    assert objectives.priority("elsewhere") == 0  # another pool's objective does not count
    assert objectives.priority("from-file") == -5  # the file's entries stay

    apiserver.put("inferenceobjectives", objective("interactive", None))  # no priority: 0
    apiserver.put("inferenceobjectives", objective("batch", 3))
    await eventually(lambda: objectives.priority("batch") == 3 and "interactive" in objectives.names())
    assert objectives.priority("interactive") == 0

    apiserver.delete("inferenceobjectives", "batch")
    await eventually(lambda: "batch" not in objectives.names())
    assert w.objective_watch.lists == 1  # all through the watch


async def test_an_objective_moved_to_another_pool_is_dropped(apiserver, watch, stores):
    objectives, _ = stores
    apiserver.put("inferenceobjectives", objective("batch", -1))
    watch()
    await eventually(lambda: objectives.priority("batch") == -1)
    apiserver.put("inferenceobjectives", objective("batch", -1, pool="another-pool"))
    await eventually(lambda: "batch" not in objectives.names())


async def test_objectives_survive_410_gone_with_a_relist(apiserver, watch, stores):
    objectives, _ = stores
    apiserver.put("inferenceobjectives", objective("batch", -1))
    w = watch()
    await eventually(lambda: objectives.priority("batch") == -1 and len(apiserver.watchers) == 2)
    apiserver.bookmark_interval = None  # no bookmark may rescue the old version
    # Changes happen while the watch is down, then the log is compacted: resuming is impossible.
    apiserver.drop_watches()
    apiserver.delete("inferenceobjectives", "batch")
    apiserver.put("inferenceobjectives", objective("new", 7))
    apiserver.compact()
    await eventually(lambda: objectives.priority("new") == 7 and "batch" not in objectives.names())
    assert w.objective_watch.lists >= 2


async def test_rewrites_of_our_pool_are_added_changed_and_deleted(apiserver, watch, stores):
    _, rewrites = stores
    apiserver.put("inferencemodelrewrites", rewrite("canary", "alias", {"model-v1": 1}))
    apiserver.put("inferencemodelrewrites", rewrite("theirs", "mine", {"x": 1}, pool="another-pool"))
    watch()
    await eventually(lambda: rewrites.target("alias") == "model-v1")
    assert rewrites.target("mine") == "mine"

    apiserver.put("inferencemodelrewrites", rewrite("canary", "alias", {"model-v2": 1, "model-v1": 0}))
    await eventually(lambda: rewrites.target("alias") == "model-v2")
    assert {rewrites.target("alias") for _ in range(50)} == {"model-v2"}  # weight 0 is never chosen

    apiserver.delete("inferencemodelrewrites", "canary")
    await eventually(lambda: rewrites.target("alias") == "alias")


async def test_the_oldest_rewrite_wins_and_one_without_pool_ref_applies(apiserver, watch, stores):
    _, rewrites = stores
    apiserver.put("inferencemodelrewrites", rewrite("b-newer", "alias", {"new": 1}, created="2026-02-01T00:00:00Z"))
    apiserver.put("inferencemodelrewrites", rewrite("a-older", "alias", {"old": 1}, pool=None, created="2026-01-01T00:00:00Z"))
    watch()
    await eventually(lambda: len(rewrites.rules) == 2)
    assert rewrites.target("alias") == "old"


async def test_a_missing_crd_is_retried_until_it_is_installed(apiserver, watch, stores):
    objectives, rewrites = stores
    apiserver.missing = {"inferenceobjectives", "inferencemodelrewrites"}
    watch()
    await eventually(lambda: apiserver.count("GET", "inferenceobjectives") >= 2)
    assert objectives.priority("from-file") == -5
    apiserver.missing = set()
    apiserver.put("inferenceobjectives", objective("batch", -1))
    apiserver.put("inferencemodelrewrites", rewrite("canary", "alias", {"model-v1": 1}))
    await eventually(lambda: objectives.priority("batch") == -1 and rewrites.target("alias") == "model-v1", timeout=15)


async def test_an_object_that_does_not_decode_is_skipped(apiserver, watch, stores):
    objectives, _ = stores
    bad = objective("bad", None)
    bad["spec"]["priority"] = "high"
    apiserver.put("inferenceobjectives", bad)
    apiserver.put("inferenceobjectives", objective("good", 2))
    watch()
    await eventually(lambda: objectives.priority("good") == 2)
    assert "bad" not in objectives.names()
