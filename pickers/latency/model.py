"""The latency model: per endpoint, how long until a request's first token and how long each token
after it, learned online from what the EPP sees (no sidecar, no training service).

    TTFT(e, r) = overhead(e) + (prefill tokens queued ahead of r on e + r's uncached tokens on e)
                 / prefill_rate(e) + batch_cost(e) * running batch of e
    TPOT(e)    = tpot_base(e) + tpot_per_running(e) * running batch of e
    P/D:  TTFT = TTFT(p, r) + KV transfer(r's tokens the decode endpoint lacks) + TPOT(d)

"Queued ahead" is the EPP's own count of uncached prompt tokens sent to e that have not produced
their first byte (`Endpoint.in_flight_prefill_tokens`); the running batch is the larger of the EPP's
in-flight requests on e and e's scraped `running`. Request control feeds each response back: its time
to first byte and its tokens (extproc.requestcontrol.latency). The coefficients are running fits
(pickers.latency.fit), one pair per endpoint, kept on the Endpoint itself (`Endpoint.latency`) so the
datastore holds the state and an endpoint that leaves takes its fit with it.

Until an endpoint has `min_samples` observations its predictions come from a warm endpoint of the
same hardware class if the pool has one (same role, same `vllm:cache_config_info` block size and
block count: the same server on the same accelerator, usually; for TTFT, failing that, one of another
role with the same block size and count), else from its own fit, which starts at
the prior (`LatencyPrior`, a GPU-class server) and moves to the data within a few observations. So a
CPU server and a GPU server get their own numbers without configuration. The KV transfer of P/D is
the prior's (it is not observed apart from the prefill that precedes it).

For a whole pool at once, `coefficient_columns` gives every candidate's coefficients as arrays (what
the vectorised latency plugins compute with), kept between picks and updated for the fits observed
since, so a pick at 1,000 endpoints does not walk 1,000 fits.

Pure: no I/O, no clock, no imports from the rest of pickers (the framework's Endpoint imports this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pickers.latency.fit import Fit2, Fit3

# pickers.framework.endpoint.ROLE_LABEL, named again here: that module imports this one
_ROLE_LABEL = "llm-d.ai/role"
_ERROR_ALPHA = 0.05  # how fast the running prediction error follows
_INF = float("inf")


@dataclass(slots=True, frozen=True)
class LatencyPrior:
    """What an endpoint is assumed to be before it is observed: a GPU server. The prefill rate is
    llm-d's calibrated peakPrefillThroughput (Qwen3-32B on 2 x H100, vLLM 0.19)."""

    prefill_tokens_per_s: float = 15_928.0
    ttft_overhead_s: float = 0.020
    ttft_per_running_s: float = 0.0002
    tpot_base_s: float = 0.010
    tpot_per_running_s: float = 0.0001
    kv_transfer_tokens_per_s: float = 200_000.0  # ~128 KiB a token over RDMA at ~25 GB/s
    kv_transfer_overhead_s: float = 0.002


@dataclass(slots=True, frozen=True)
class LatencySettings:
    prior: LatencyPrior = field(default_factory=LatencyPrior)
    prior_weight: float = 2.0  # the prior counts as this many observations
    window: int = 200  # about this many recent observations count (exponential forgetting)
    min_samples: int = 8  # observations before an endpoint's own fit is trusted over a warm peer's

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_samples < 1 or self.prior_weight <= 0:
            raise ValueError("latency settings: window >= 2, min_samples >= 1 and prior_weight > 0 expected")


# The typical request the prior's weight is measured at: prefill tokens, running batch.
_TTFT_REF = (2048.0, 8.0)
_TPOT_REF = 8.0


@dataclass(slots=True, eq=False)
class EndpointLatency:
    """One endpoint's fits and bookkeeping; created empty with the Endpoint, fitted by LatencyModel."""

    ttft: Fit3 | None = None  # seconds ~ overhead + s/token * prefill tokens + s/seq * batch
    tpot: Fit2 | None = None  # seconds per output token ~ base + s/seq * batch
    # running mean |predicted - observed| TTFT of the responses counted, and of (predicted - observed):
    # > 0 the model is pessimistic here (seconds). Predicted: the pick's prediction when one was made
    # (--explain-scores), else the fit's for the response's own counts, before it counted it
    ttft_error: float = 0.0
    ttft_bias: float = 0.0
    last_ttft: tuple[float, float] | None = None  # (predicted, observed) seconds, the latest response
    skipped: int = 0  # responses that taught nothing (errors, aborts, no first byte)
    # TPOT SLOs (ms) of the requests running here with one (predicted-latency-producer's streaming
    # mode): SLO -> count, and the tightest
    tpot_slos: dict[float, int] = field(default_factory=dict)
    min_tpot_slo: float = 0.0

    def add_tpot_slo(self, slo: float) -> None:
        self.tpot_slos[slo] = self.tpot_slos.get(slo, 0) + 1
        if self.min_tpot_slo == 0.0 or slo < self.min_tpot_slo:
            self.min_tpot_slo = slo

    def remove_tpot_slo(self, slo: float) -> None:
        n = self.tpot_slos.get(slo, 0)
        if n > 1:
            self.tpot_slos[slo] = n - 1
        elif n == 1:
            del self.tpot_slos[slo]
            if slo == self.min_tpot_slo:
                self.min_tpot_slo = min(self.tpot_slos, default=0.0)


class _Metrics(Protocol):
    running: int
    block_size: int | None
    num_gpu_blocks: int | None


class LatencyEndpoint(Protocol):
    """What the model reads of an endpoint (pickers.framework.endpoint.Endpoint has it all)."""

    in_flight: int
    in_flight_prefill_tokens: int
    latency: EndpointLatency

    @property
    def metrics(self) -> Any: ...

    @property
    def labels(self) -> Any: ...


def batch_of(ep: LatencyEndpoint) -> int:
    """The running batch a request joins: the EPP's own in-flight requests on the endpoint, or its
    scraped `running` when other traffic makes that larger."""
    running = ep.metrics.running
    return running if running > ep.in_flight else ep.in_flight


def _better(st: EndpointLatency, best: EndpointLatency | None) -> bool:
    """`st` has seen more responses than the current best of its class (or there is none)."""
    return best is None or (best is not st and (best.ttft.n if best.ttft else 0) < (st.ttft.n if st.ttft else 0))


class _Coefficients:
    """Every candidate's coefficients (rows: TTFT c0, c1, c2, TPOT c0, c1; a column per candidate), the
    fits they come from, and which candidates' fits are not their own yet (a peer's or the prior)."""

    __slots__ = ("endpoints", "values", "ttft_fits", "tpot_fits", "users", "cold", "structure", "peers")

    def __init__(self, endpoints: Sequence[LatencyEndpoint], structure: int, peers: int) -> None:
        self.endpoints = endpoints
        self.values = np.zeros((5, len(endpoints)))
        self.ttft_fits: list[Fit3] = []
        self.tpot_fits: list[Fit2] = []
        self.users: dict[int, list[int]] = {}  # id(fit) -> the columns it gives
        # (column, the endpoint's metrics and hardware class when resolved) of the columns not on their own fits
        self.cold: list[tuple[int, Any, tuple[str, int, int] | None]] = []
        self.structure, self.peers = structure, peers


class LatencyModel:
    """Predictions and the online fit for every endpoint, under one set of settings. The composition
    root (extproc.server) makes one and hands it to request control and to the plugins."""

    def __init__(self, settings: LatencySettings | None = None) -> None:
        self.settings = s = settings or LatencySettings()
        self._decay = 1.0 - 1.0 / s.window
        self._min = s.min_samples
        p = s.prior
        self._ttft_prior = (p.ttft_overhead_s, 1.0 / p.prefill_tokens_per_s, p.ttft_per_running_s)
        self._kv_s_per_token = 1.0 / p.kv_transfer_tokens_per_s
        # hardware class -> the state of its best-observed warm member (the prior of its cold peers)
        self._peers: dict[tuple[str, int, int], EndpointLatency] = {}
        # (KV block size, KV blocks) -> the same, whatever the role: a cold endpoint's TTFT when no peer
        # of its own role is warm (a P/D pool's prefill and decode servers on one accelerator prefill alike)
        self._geometry_peers: dict[tuple[int, int], EndpointLatency] = {}
        # what coefficient_columns keeps between picks: the fits observed since its last call, and
        # counters of the changes that move a candidate to another fit (its own warming up, a peer's
        # promotion, an endpoint forgotten)
        self._columns: _Coefficients | None = None
        self._touched: set[int] = set()
        self._structure = 0
        self._peer_version = 0

    # -- the fits ------------------------------------------------------------------------------
    def _own_ttft(self, st: EndpointLatency) -> Fit3:
        f = st.ttft
        if f is None:
            s = self.settings
            f = st.ttft = Fit3(self._ttft_prior, _TTFT_REF, s.prior_weight, self._decay, s.min_samples)
        return f

    def _own_tpot(self, st: EndpointLatency) -> Fit2:
        f = st.tpot
        if f is None:
            s, p = self.settings, self.settings.prior
            f = st.tpot = Fit2(p.tpot_base_s, p.tpot_per_running_s, _TPOT_REF, s.prior_weight, self._decay, s.min_samples)
        return f

    @staticmethod
    def hardware_class(ep: LatencyEndpoint) -> tuple[str, int, int] | None:
        """(role, KV block size, KV blocks) from the endpoint's labels and `cache_config_info`; None
        until its cache config was scraped."""
        m = ep.metrics
        if m.block_size is None or m.num_gpu_blocks is None:
            return None
        return (ep.labels.get(_ROLE_LABEL, ""), m.block_size, m.num_gpu_blocks)

    def ttft_fit(self, ep: LatencyEndpoint) -> tuple[Fit3, str]:
        """The fit that predicts this endpoint's TTFT and where it comes from: "own", "peer" or "prior".
        A peer: the warm member of its hardware class, else (prefill is the accelerator's, whatever the
        role) a warm endpoint of another role with the same KV block size and block count."""
        st = ep.latency
        f = st.ttft or self._own_ttft(st)
        if f.n >= self._min:
            return f, "own"
        key = self.hardware_class(ep) if self._peers else None
        if key is not None:
            peer = self._peers.get(key)
            if peer is None or peer is st:
                peer = self._geometry_peers.get(key[1:])
            if peer is not None and peer is not st and peer.ttft is not None:
                return peer.ttft, "peer"
        return f, "own" if f.n else "prior"

    def tpot_fit(self, ep: LatencyEndpoint) -> tuple[Fit2, str]:
        st = ep.latency
        f = st.tpot or self._own_tpot(st)
        if f.n >= self._min:
            return f, "own"
        key = self.hardware_class(ep) if self._peers else None
        peer = self._peers.get(key) if key is not None else None
        if peer is not None and peer is not st and peer.tpot is not None and peer.tpot.n >= self.settings.min_samples:
            return peer.tpot, "peer"
        return f, "own" if f.n else "prior"

    # -- predictions (seconds) -----------------------------------------------------------------
    def ttft(
        self, ep: LatencyEndpoint, uncached_tokens: int, *, queued: int | None = None, batch: int | None = None, fresh: bool = True
    ) -> float:
        """Time to first token of a request whose prompt has `uncached_tokens` not cached on `ep`,
        prefilled and decoded there (aggregated). `queued` / `batch`: the prefill tokens ahead and the
        running batch to assume (default: the endpoint's now). `fresh=False`: with the coefficients as
        last solved (a few observations old at most; cheaper)."""
        f = self.ttft_fit(ep)[0]
        c0, c1, c2 = f.coefficients() if fresh else (f.c0, f.c1, f.c2)
        q = ep.in_flight_prefill_tokens if queued is None else queued
        b = batch_of(ep) if batch is None else batch
        return c0 + c1 * (q + uncached_tokens) + c2 * b

    def prefill_seconds(self, ep: LatencyEndpoint, tokens: int, *, fresh: bool = True) -> float:
        """The compute time of `tokens` prompt tokens on `ep` alone (its fitted time per prefill token)."""
        f = self.ttft_fit(ep)[0]
        return (f.coefficients()[1] if fresh else f.c1) * tokens

    def tpot(self, ep: LatencyEndpoint, *, batch: int | None = None, fresh: bool = True) -> float:
        """Time per output token on `ep` with `batch` running (default: its batch now)."""
        f = self.tpot_fit(ep)[0]
        c0, c1 = f.coefficients() if fresh else (f.c0, f.c1)
        return c0 + c1 * (batch_of(ep) if batch is None else batch)

    def kv_transfer(self, tokens: int) -> float:
        """Moving `tokens` tokens of KV from a prefill endpoint to a decode endpoint (the prior's rate)."""
        if tokens <= 0:
            return 0.0
        return self.settings.prior.kv_transfer_overhead_s + tokens * self._kv_s_per_token

    def ttft_disaggregated(
        self,
        decode: LatencyEndpoint,
        prefill: LatencyEndpoint,
        prefill_uncached_tokens: int,
        transfer_tokens: int,
        *,
        queued: int | None = None,
        batch: int | None = None,
        fresh: bool = True,
    ) -> float:
        """TTFT when `prefill` computes the prompt (its `prefill_uncached_tokens`, behind `queued`),
        the decode endpoint pulls `transfer_tokens` of KV and then decodes the first token. Compare
        with `ttft(decode, uncached on decode)` to decide whether disaggregating pays."""
        return (
            self.ttft(prefill, prefill_uncached_tokens, queued=queued, batch=batch, fresh=fresh)
            + self.kv_transfer(transfer_tokens)
            + self.tpot(decode, fresh=fresh)
        )

    def coefficient_columns(self, endpoints: Sequence[LatencyEndpoint]) -> np.ndarray:
        """Rows TTFT c0, c1, c2, TPOT c0, c1 of every endpoint (a column each, in their order), as
        `ttft` and `tpot` with fresh coefficients use them. Kept for the last endpoints sequence: only
        the columns whose fit was observed since are solved again, and only endpoints not on their own
        fits yet are looked up again when a peer or their metrics changed. Read-only."""
        c = self._columns
        if c is None or c.endpoints is not endpoints:
            c = self._columns = _Coefficients(endpoints, self._structure, self._peer_version)
            c.ttft_fits = [None] * len(endpoints)  # type: ignore[list-item]
            c.tpot_fits = [None] * len(endpoints)  # type: ignore[list-item]
            self._touched.clear()
            for i in range(len(endpoints)):
                self._resolve(c, i)
            return c.values
        if c.cold:
            if c.structure != self._structure or c.peers != self._peer_version:
                cold, c.cold = c.cold, []
                for i, _, _ in cold:
                    self._resolve(c, i)
            elif self._peers:  # a peer is found by hardware class: a class that changed may find another
                self._reclassify(c)
        c.structure, c.peers = self._structure, self._peer_version
        if self._touched:
            users = c.users
            for fit_id in self._touched:
                for i in users.get(fit_id, ()):
                    self._solve(c, i)
            self._touched.clear()
        return c.values

    def _reclassify(self, c: _Coefficients) -> None:
        """Resolve again the cold columns whose endpoint's hardware class changed since (its cache config
        scraped at last, say). New metrics objects come with every scrape, so most changes are only
        noted: resolving every cold column whenever one was scraped cost 4.8 ms a pick at 1,000
        endpoints with the scraper running, against 0.47 without."""
        endpoints = c.endpoints
        changed = [k for k, (i, m, _) in enumerate(c.cold) if endpoints[i].metrics is not m]
        if not changed:
            return
        again = []
        for k in changed:
            i, _, key = c.cold[k]
            ep = endpoints[i]
            now = self.hardware_class(ep)
            if now == key:
                c.cold[k] = (i, ep.metrics, key)
            else:
                again.append(k)
        for k in reversed(again):  # _resolve appends the column again if it is still cold
            i = c.cold.pop(k)[0]
            self._resolve(c, i)

    def _resolve(self, c: _Coefficients, i: int) -> None:
        ep = c.endpoints[i]
        for fits in (c.ttft_fits, c.tpot_fits):
            old = fits[i]
            if old is not None:
                c.users[id(old)].remove(i)
        tf, t_source = self.ttft_fit(ep)
        pf, p_source = self.tpot_fit(ep)
        c.ttft_fits[i], c.tpot_fits[i] = tf, pf
        c.users.setdefault(id(tf), []).append(i)
        c.users.setdefault(id(pf), []).append(i)
        st = ep.latency  # its own fits exist now; until both are warm a peer may come to predict for it
        if t_source != "own" or p_source != "own" or st.ttft.n < self._min or st.tpot.n < self._min:  # type: ignore[union-attr]
            c.cold.append((i, ep.metrics, self.hardware_class(ep)))
        self._solve(c, i)

    @staticmethod
    def _solve(c: _Coefficients, i: int) -> None:
        c.values[0:3, i] = c.ttft_fits[i].coefficients()
        c.values[3:5, i] = c.tpot_fits[i].coefficients()

    # -- the feed ------------------------------------------------------------------------------
    def observe_ttft(self, ep: LatencyEndpoint, prefill_tokens: int, batch: int, seconds: float, predicted: float | None = None) -> None:
        """A response's time to first token on the endpoint that prefilled it: `prefill_tokens` =
        queued ahead + its own uncached, `batch` as at the pick. `predicted`: what the model said at
        the pick, for the running error (None: the fit's own prediction for these counts)."""
        st = ep.latency
        if not 0.0 < seconds < _INF:
            st.skipped += 1
            return
        f = st.ttft or self._own_ttft(st)
        fitted = f.observe(prefill_tokens, batch, seconds)
        self._touched.add(id(f))
        if f.n == self._min:
            self._structure += 1  # its own fit now predicts for it
        if predicted is None:
            predicted = fitted
        err = predicted - seconds
        a = 1.0 / f.n if f.n * _ERROR_ALPHA < 1.0 else _ERROR_ALPHA  # a plain mean until it has 20
        st.ttft_error += a * ((err if err > 0 else -err) - st.ttft_error)
        st.ttft_bias += a * (err - st.ttft_bias)
        st.last_ttft = (predicted, seconds)
        n = f.n
        if n >= self._min and (n == self._min or n % 32 == 0):  # now and then: who is its class's best
            self._promote(ep, st)

    def observe_tpot(self, ep: LatencyEndpoint, batch: int, seconds_per_token: float) -> None:
        if 0.0 < seconds_per_token < _INF:
            st = ep.latency
            f = st.tpot or self._own_tpot(st)
            f.observe(batch, seconds_per_token)
            self._touched.add(id(f))
            if f.n == self._min:
                self._structure += 1

    def _promote(self, ep: LatencyEndpoint, st: EndpointLatency) -> None:
        """Make `st` its hardware class's prior if it is the best-observed warm member."""
        key = self.hardware_class(ep)
        if key is None:
            return
        if _better(st, self._peers.get(key)):
            self._peers[key] = st
            self._peer_version += 1
        if _better(st, self._geometry_peers.get(key[1:])):
            self._geometry_peers[key[1:]] = st
            self._peer_version += 1

    def forget(self, ep: LatencyEndpoint) -> None:
        """The endpoint left the pool: it is no one's prior any more."""
        st = ep.latency
        self._structure += 1
        self._peer_version += 1
        self._columns = None
        for key in [k for k, v in self._peers.items() if v is st]:
            del self._peers[key]
        for geometry in [k for k, v in self._geometry_peers.items() if v is st]:
            del self._geometry_peers[geometry]

    # -- what /debug/endpoints and `epp status` show --------------------------------------------
    def view(self, ep: LatencyEndpoint) -> dict[str, Any]:
        st = ep.latency
        t, t_source = self.ttft_fit(ep)
        p, p_source = self.tpot_fit(ep)
        t.coefficients(), p.coefficients()  # solved with every observation counted
        own_t, own_p = self._own_ttft(st), self._own_tpot(st)
        out: dict[str, Any] = {
            "source": t_source,
            "samples": own_t.n,
            "tpot_samples": own_p.n,
            "outliers_clipped": own_t.clipped + own_p.clipped,
            "prefill_tokens_per_s": round(1.0 / t.c1, 1),
            "ttft_overhead_ms": round(t.c0 * 1000, 3),
            "ttft_ms_per_running": round(t.c2 * 1000, 4),
            "tpot_source": p_source,
            "tpot_base_ms": round(p.c0 * 1000, 3),
            "tpot_ms_per_running": round(p.c1 * 1000, 4),
            "ttft_residual": round(own_t.scale, 4),  # mean |relative residual| of its own fit
            "ttft_error_ms": round(st.ttft_error * 1000, 1),  # running mean |predicted - observed|
            "ttft_bias_ms": round(st.ttft_bias * 1000, 1),
            "skipped": st.skipped,
        }
        if st.last_ttft is not None:
            out["last_ttft_ms"] = {"predicted": round(st.last_ttft[0] * 1000, 1), "observed": round(st.last_ttft[1] * 1000, 1)}
        return out
