"""Long runs of the request path in-process (marked slow): memory levels off, the prefix index stays
at its bound, in-flight counts return to zero, nothing is left behind."""

from __future__ import annotations

import gc
import json
import os
import random
import string

import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.strategies import build_profile
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import DEFAULT_CAPACITY, ApproxPrefixIndex
from tests.unit.test_protocol import body_msg, headers_msg, response_body_msg, response_headers_msg

pytestmark = pytest.mark.slow
ADDRS = [f"10.0.0.{i}:8000" for i in range(1, 5)]
CAPACITY = DEFAULT_CAPACITY  # blocks per endpoint (lruCapacityPerServer): 100k prompts hold ~8x more


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_100k_random_prompts_keep_memory_and_state_bounded():
    rng = random.Random(7)
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in ADDRS)
    index = ApproxPrefixIndex()
    director = Director(ds, Scheduler(build_profile("best", index, rng=random.Random(0))), EppMetrics())
    usage = json.dumps({"id": "x", "usage": {"prompt_tokens": 100, "completion_tokens": 4, "total_tokens": 104}}).encode()
    alphabet = string.ascii_letters + " "
    rss: dict[int, float] = {}
    total = 100_000
    for i in range(total):
        prompt = "".join(rng.choices(alphabet, k=rng.randint(100, 1200)))
        body = json.dumps({"model": rng.choice(["m", f"model-{i}"]), "prompt": prompt, "max_tokens": 4}).encode()
        stream = RequestStream(director)
        stream.handle(headers_msg())
        cut = rng.randint(1, len(body))
        stream.handle(body_msg(body[:cut], False))
        stream.handle(body_msg(body[cut:], True))
        fate = i % 4
        if fate != 3:  # a quarter of the clients go away before the response
            stream.handle(response_headers_msg(status=200 if fate else 500))
            stream.handle(response_body_msg(usage, True))
        stream.close()
        if i in (20_000, total - 1):
            gc.collect()
            rss[i] = _rss_mib()
    assert ds.total_in_flight() == 0
    assert all(ep.in_flight_tokens == 0 for ep in ds.candidates())
    assert index.size() <= CAPACITY * len(ADDRS)
    assert index.size() > CAPACITY * len(ADDRS) * 0.9  # reached its bound and stayed there
    # Memory levels off: the last 80k requests may not grow the process by more than a few MiB
    # (model names from clients are capped in the metrics; the index is bounded).
    assert rss[total - 1] - rss[20_000] < 16, rss
