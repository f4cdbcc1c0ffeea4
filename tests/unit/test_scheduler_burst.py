"""Load between scrapes (issue 3 item 4): a burst of same-prefix requests arrives faster than any
scrape, so only the EPP's own in-flight counts (acquired at pick, released at completion) can see it.
Driven through Scheduler + Datastore as the Director does, with metrics frozen as if unscraped."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from extproc.datalayer.datastore import Datastore
from pickers.config.loader import DEFAULT_CONFIG_TEXT, load_config
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.plugins.base import PluginContext

BEST = (Path(__file__).resolve().parents[2] / "pickers" / "configs" / "best.yaml").read_text()
SHARED = "You are a helpful assistant. " * 140  # ~4,000 characters, ~1,000 tokens, shared by all
MAX_TOKENS = 200


def make(config_text: str) -> tuple[Datastore, Scheduler]:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(4))
    ctx = PluginContext(rng=random.Random(7))
    cfg = load_config(config_text, "test", ctx)
    return ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)  # as the server builds it


def request(i: int, shared: str = SHARED) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", {}, "completions", "m", shared + f"question {i}", max_tokens=MAX_TOKENS)


def route(ds: Datastore, scheduler: Scheduler, req: InferenceRequest) -> tuple[str, int]:
    """What Director.route does: pick, then count the request (and its prefill work) in flight."""
    result = scheduler.schedule(req, ds.candidates())
    primary = result.endpoints[0]
    tokens = req.prompt_tokens + (req.max_tokens or 0)
    ds.acquire(primary, tokens, result.prefill_tokens)
    return primary.address, tokens


def burst(ds: Datastore, scheduler: Scheduler, n: int = 100, shared: str = SHARED) -> list[tuple[str, int]]:
    return [route(ds, scheduler, request(i, shared)) for i in range(n)]


def release_all(ds: Datastore, routed: list[tuple[str, int]]) -> None:
    for address, tokens in routed:
        ep = ds.get(address)
        assert ep is not None
        ds.release(ep, tokens)
        ep.in_flight_prefill_tokens = 0  # what Director.first_byte / finish settle


def test_gie_default_piles_a_same_prefix_burst_on_one_endpoint():
    # Why the best config adds EPP-side load: scraped metrics cannot see a burst in progress.
    ds, scheduler = make(DEFAULT_CONFIG_TEXT)
    counts = Counter(addr for addr, _ in burst(ds, scheduler))
    assert len(counts) == 1


def test_best_config_spreads_a_same_prefix_burst_once_an_endpoint_is_busy():
    ds, scheduler = make(BEST)
    counts = Counter(addr for addr, _ in burst(ds, scheduler))
    assert len(counts) == 4, counts
    assert max(counts.values()) <= 40, counts


def test_best_config_keeps_affinity_while_the_cached_endpoint_is_not_busy():
    ds, scheduler = make(BEST)
    # each request after the first waits behind the prefill queued there (~1,000 tokens) and adds a
    # running request, against computing the ~1,000-token prompt afresh elsewhere: 4 stay together
    routed = burst(ds, scheduler, n=4)
    assert len({addr for addr, _ in routed}) == 1


def test_best_config_spreads_a_burst_of_short_same_prefix_requests_too():
    ds, scheduler = make(BEST)
    counts = Counter(addr for addr, _ in burst(ds, scheduler, shared="short shared system prompt. " * 12))
    assert len(counts) >= 2 and max(counts.values()) < 100, counts


def test_affinity_returns_once_the_burst_completes():
    ds, scheduler = make(BEST)
    routed = burst(ds, scheduler, n=60)
    warm = {addr for addr, _ in routed}
    assert len(warm) > 1, routed  # spilled over
    release_all(ds, routed)
    # one at a time now (each completes before the next): the prefix keeps them on warm endpoints
    follow = set()
    for i in range(100, 130):
        addr, tokens = route(ds, scheduler, request(i))
        follow.add(addr)
        release_all(ds, [(addr, tokens)])
    assert follow <= warm


def test_in_flight_counts_return_to_zero_after_release():
    ds, scheduler = make(BEST)
    routed = burst(ds, scheduler)
    release_all(ds, routed)
    assert all(ep.in_flight == 0 and ep.in_flight_tokens == 0 for ep in ds.candidates())
