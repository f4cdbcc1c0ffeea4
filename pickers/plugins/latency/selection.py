"""GIE's headroom-weighted random choice of one endpoint, as its SLO-aware scorers made it before the
decomposition into predicted-latency-producer + slo-headroom-tier-filter + latency-scorer: the
predicted-latency-scorer of GIE v1.x (legacy_scorer.py) and the slo-scorer of GIE's
slo-prediction-experimental branch (slo_branch.py). Each turns predictions into integer weights and
draws one endpoint by them; the scorer then gives it 1 and the others 0.

- positive headroom (both SLOs met): each headroom min-max normalized over the bucket (0.5 without
  spread), blended `alpha * nTTFT + beta * nTPOT` (weights normalized, both 0: TTFT alone); `least`
  weighs `int((1 - blend) * 99) + 2` (closest to the SLO: packing), `most` `int(blend * 99) + 2`;
- negative headroom: GIE's hierarchy of buckets (both missed, only TTFT, only TPOT, neither), each
  weighted by its normalized, blended deficit `int((1 - blend) * 80) + 2`, the last bucket 1 each;
- composite (GIE's fallback and its `composite-*` strategies): `kv * free KV + queue * (max - q) /
  (max - min) + prefix * prefix share` (weights normalized), `round(1 + 99 * composite)`; `least`
  inverts it to `101 - w`.

The draw is `rng.randrange(total)` over the weights in order; `argmax` takes the first highest instead
(GIE's selectionMode `max`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint
from pickers.plugins.latency.producer import LatencyPrediction

W_MAX = 100
MIN_WEIGHT = 1
NEG_RANGE = 80
EPS = 1e-9


@dataclass(slots=True, frozen=True)
class Candidate:
    endpoint: Endpoint
    prediction: LatencyPrediction
    prefix: float = 0.0  # the share of the prompt's blocks the endpoint holds (GIE's PrefixCacheScore)


def blend_weights(alpha: float, beta: float) -> tuple[float, float]:
    """GIE's normalization of a TTFT/TPOT pair: to a sum of 1; both 0 (or less): TTFT alone."""
    if alpha + beta <= 0:
        return 1.0, 0.0
    total = alpha + beta
    return alpha / total, beta / total


def _norm(values: Sequence[float], empty: float) -> list[float]:
    lo, hi = min(values), max(values)
    spread = hi - lo
    return [(v - lo) / (spread + EPS) if spread > EPS else empty for v in values]


def positive_weights(cands: Sequence[Candidate], alpha: float, beta: float, *, most: bool) -> list[int]:
    alpha, beta = blend_weights(alpha, beta)
    n_ttft = _norm([c.prediction.ttft_headroom_ms for c in cands], 0.5)
    n_tpot = _norm([c.prediction.tpot_headroom_ms for c in cands], 0.5)
    out = []
    for t, p in zip(n_ttft, n_tpot):
        combined = alpha * t + beta * p
        out.append(int((combined if most else 1.0 - combined) * (W_MAX - MIN_WEIGHT)) + MIN_WEIGHT + 1)
    return out


def _deficit_weights(cands: Sequence[Candidate], alpha: float, beta: float) -> list[int]:
    alpha, beta = blend_weights(alpha, beta)
    n_ttft = _norm([max(0.0, -c.prediction.ttft_headroom_ms) for c in cands], 0.0)
    n_tpot = _norm([max(0.0, -c.prediction.tpot_headroom_ms) for c in cands], 0.0)
    return [int((1.0 - (alpha * t + beta * p)) * NEG_RANGE) + MIN_WEIGHT + 1 for t, p in zip(n_ttft, n_tpot)]


def negative_choices(cands: Sequence[Candidate], alpha: float, beta: float) -> list[tuple[Candidate, int]]:
    """GIE's hierarchical weights, in its bucket order: both SLOs missed, only TTFT, only TPOT, neither."""
    buckets: list[list[Candidate]] = [[], [], [], []]
    for c in cands:
        ttft_neg, tpot_neg = c.prediction.ttft_headroom_ms < 0, c.prediction.tpot_headroom_ms < 0
        buckets[0 if ttft_neg and tpot_neg else 1 if ttft_neg else 2 if tpot_neg else 3].append(c)
    out: list[tuple[Candidate, int]] = []
    for bucket in buckets[:3]:
        if bucket:
            out.extend(zip(bucket, _deficit_weights(bucket, alpha, beta)))
    out.extend((c, MIN_WEIGHT) for c in buckets[3])
    return out


def composite_weights(cands: Sequence[Candidate], kv: float, queue: float, prefix: float, *, least: bool = False) -> list[int]:
    total = kv + queue + prefix
    if total <= 0:
        kv, queue, prefix = 1.0, 0.0, 0.0
    else:
        kv, queue, prefix = kv / total, queue / total, prefix / total
    waiting = [c.endpoint.metrics.waiting for c in cands]
    lo, hi = min(waiting), max(waiting)
    out = []
    for c, q in zip(cands, waiting):
        rel_queue = (hi - q) / (hi - lo) if hi > lo else 1.0
        composite = kv * (1.0 - c.endpoint.metrics.kv_usage) + queue * rel_queue + prefix * c.prefix
        w = math.floor(MIN_WEIGHT + (W_MAX - MIN_WEIGHT) * composite + 0.5)  # Go's math.Round for >= 0
        out.append(MIN_WEIGHT + W_MAX - w if least else w)
    return out


def draw(choices: Sequence[tuple[Candidate, int]], rng: random.Random, *, argmax: bool = False) -> Candidate | None:
    """One candidate, with probability weight / total (or the first of the highest weight)."""
    total = sum(w for _, w in choices if w > 0)
    if total <= 0:
        return None
    if argmax:
        return max(choices, key=lambda cw: cw[1])[0]
    at = rng.randrange(total)
    for c, w in choices:
        if w <= 0:
            continue
        if at < w:
            return c
        at -= w
    return choices[0][0]  # not reached: the weights sum to total


def split_by_headroom(cands: Sequence[Candidate], *, strict: bool = False) -> tuple[list[Candidate], list[Candidate]]:
    """(both SLOs met, the others): headroom >= 0 (GIE v1.x), > 0 with `strict` (the experimental branch)."""
    positive: list[Candidate] = []
    negative: list[Candidate] = []
    for c in cands:
        t, p = c.prediction.ttft_headroom_ms, c.prediction.tpot_headroom_ms
        ok = (t > 0 and p > 0) if strict else (t >= 0 and p >= 0)
        (positive if ok else negative).append(c)
    return positive, negative


def idle_first(cands: Sequence[Candidate]) -> list[Candidate]:
    """GIE's negative-bucket rule: endpoints with no request in flight from this EPP, when there are any."""
    idle = [c for c in cands if c.prediction.dispatched == 0]
    return idle or list(cands)
