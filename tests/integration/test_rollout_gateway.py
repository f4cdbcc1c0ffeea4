"""A DisaggregatedSet rollout end to end: real Envoy -> llm-epp with disaggregatedset-rollout-screener ->
pd-sidecars -> simulated prefill and decode servers labelled with two complete revisions and one
without a prefill pod. Each request's prefill leg (counted by the prefill simulators) must run on the
revision the client is told in x-disagg-revision; a pinned incomplete revision is a 503."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.devstack.stack import LocalStack, PdPool, StackOptions
from tests.integration.conftest import FAST_SIM, MODEL

pytestmark = pytest.mark.envoy

CONFIG = Path(__file__).resolve().parents[1] / "unit" / "configs" / "rollout" / "pd-strict-revision.yaml"
REV = "disaggregatedset.x-k8s.io/revision"
# endpoint name -> revision: blue and green are complete, amber has a decode pod only
REVISIONS = {"prefill-0": "blue", "decode-0": "blue", "prefill-1": "green", "decode-1": "green", "decode-2": "green",
             "decode-3": "amber"}  # fmt: skip


class RolloutStack(LocalStack):
    """The P/D pool's endpoints, labelled as pods of one DisaggregatedSet in the middle of a rollout."""

    def start_pd_pool(self, pool: PdPool) -> None:
        super().start_pd_pool(pool)
        assert self.endpoints_path is not None
        doc = yaml.safe_load(self.endpoints_path.read_text())
        for entry in doc["endpoints"]:
            labels = entry.setdefault("labels", {})
            role = entry["name"].partition("-")[0]
            labels.update({"disaggregatedset.x-k8s.io/name": "chat-pd", REV: REVISIONS[entry["name"]],
                           "disaggregatedset.x-k8s.io/role": role})  # fmt: skip
        self.endpoints_path.write_text(yaml.safe_dump(doc))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    opts = StackOptions(workdir=tmp_path_factory.mktemp("rollout"), sim_args=FAST_SIM, model=MODEL,
                        pd=PdPool(prefill=2, decode=4), epp_args=("--config-file", str(CONFIG)))  # fmt: skip
    with RolloutStack(opts) as s:
        yield s


def prefill_legs(stack: LocalStack) -> list[int]:
    """Prefill legs served so far by prefill-0 and prefill-1."""
    out = []
    for port in stack.sim_ports[:2]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
            out.append(json.load(r)["prefill_legs_total"])
    return out


def complete(stack: LocalStack, headers: dict[str, str] | None = None) -> httpx.Response:
    prompt = f"[{uuid.uuid4()}] " + "Draft the release notes for the billing service. " * 40
    return httpx.post(f"{stack.base_url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3},
                      headers=headers or {}, timeout=30)  # fmt: skip


def test_prefill_and_decode_of_each_request_share_the_stamped_revision(stack):
    seen = set()
    for _ in range(12):
        before = prefill_legs(stack)
        reply = complete(stack)
        assert reply.status_code == 200, reply.text
        revision = reply.headers["x-disagg-revision"]
        after = prefill_legs(stack)
        prefilled_on = [name for name, b, a in zip(("prefill-0", "prefill-1"), before, after) if a > b]
        assert prefilled_on == [next(n for n, r in REVISIONS.items() if r == revision and n.startswith("prefill"))]
        seen.add(revision)
    assert "amber" not in seen


def test_a_pinned_revision_serves_only_there_and_an_incomplete_one_is_refused(stack):
    for _ in range(3):
        before = prefill_legs(stack)
        reply = complete(stack, {"x-disagg-revision": "blue"})
        assert reply.status_code == 200 and reply.headers["x-disagg-revision"] == "blue"
        assert [a - b for a, b in zip(prefill_legs(stack), before)] == [1, 0]
    refused = complete(stack, {"x-disagg-revision": "amber"})
    assert refused.status_code == 503
    assert "revision 'amber' (x-disagg-revision) has no Ready endpoint of role prefill" in refused.text
