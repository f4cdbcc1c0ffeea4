"""The latency model (pickers/latency): the running fits converge on synthetic GPU-like and CPU-like
servers, the prior speaks until data comes (then a warm peer of the same hardware class), outliers
are clipped, and the per-endpoint state stays on the Endpoint."""

from __future__ import annotations

import random

import pytest

from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.latency.fit import Fit2, Fit3
from pickers.latency.model import EndpointLatency, LatencyModel, LatencyPrior, LatencySettings, batch_of

GPU = dict(rate=6_667.0, overhead=0.030, per_running=0.0005, tpot=0.024, tpot_per_running=0.0003)
CPU = dict(rate=400.0, overhead=0.075, per_running=0.003, tpot=0.060, tpot_per_running=0.002)


def endpoint(name: str = "a", *, blocks: int | None = None, role: str = "") -> Endpoint:
    ep = Endpoint(EndpointSpec(name, f"10.0.0.{ord(name[0]) % 200}", 8000, labels={"llm-d.ai/role": role} if role else {}))
    if blocks is not None:
        ep.metrics = Metrics(block_size=16, num_gpu_blocks=blocks)
    return ep


def true_ttft(server: dict[str, float], tokens: float, batch: float) -> float:
    return server["overhead"] + tokens / server["rate"] + server["per_running"] * batch


def feed(model: LatencyModel, ep: Endpoint, server: dict[str, float], n: int, rng: random.Random, *, noise: float = 0.05,
         outliers: float = 0.0) -> None:  # fmt: skip
    for _ in range(n):
        tokens, batch = rng.uniform(50, 4000), rng.randint(0, 24)
        y = true_ttft(server, tokens, batch) * (1 + rng.gauss(0, noise))
        if rng.random() < outliers:
            y *= 10  # a stalled request
        model.observe_ttft(ep, int(tokens), batch, y, predicted=model.ttft(ep, int(tokens), queued=0, batch=batch))
        b = rng.randint(1, 24)
        model.observe_tpot(ep, b, (server["tpot"] + server["tpot_per_running"] * b) * (1 + rng.gauss(0, noise)))


def rel_error(model: LatencyModel, ep: Endpoint, server: dict[str, float]) -> float:
    worst = 0.0
    for tokens in (100, 1000, 4000):
        for batch in (0, 8, 16):
            want = true_ttft(server, tokens, batch)
            worst = max(worst, abs(model.ttft(ep, tokens, queued=0, batch=batch) - want) / want)
    return worst


@pytest.mark.parametrize("server", [GPU, CPU], ids=["gpu-like", "cpu-like"])
def test_the_fit_converges_on_a_server_from_the_same_prior(server):
    model, ep, rng = LatencyModel(), endpoint(), random.Random(1)
    feed(model, ep, server, 300, rng)
    assert rel_error(model, ep, server) < 0.06
    fit = ep.latency.ttft
    assert fit is not None and 1 / fit.coefficients()[1] == pytest.approx(server["rate"], rel=0.05)
    for batch in (1, 8, 20):
        want = server["tpot"] + server["tpot_per_running"] * batch
        assert model.tpot(ep, batch=batch) == pytest.approx(want, rel=0.05)


def test_gpu_and_cpu_endpoints_of_one_model_get_their_own_numbers():
    model, rng = LatencyModel(), random.Random(2)
    gpu, cpu = endpoint("g"), endpoint("c")
    feed(model, gpu, GPU, 100, rng)
    feed(model, cpu, CPU, 100, rng)
    assert model.ttft(cpu, 2000, queued=0, batch=0) > 10 * model.ttft(gpu, 2000, queued=0, batch=0)
    assert rel_error(model, gpu, GPU) < 0.15 and rel_error(model, cpu, CPU) < 0.15


def test_the_prior_predicts_until_the_first_observation():
    prior = LatencyPrior(prefill_tokens_per_s=10_000, ttft_overhead_s=0.01, ttft_per_running_s=0.001, tpot_base_s=0.02, tpot_per_running_s=0.0)
    model, ep = LatencyModel(LatencySettings(prior=prior)), endpoint()
    assert model.ttft(ep, 1000, queued=500, batch=4) == pytest.approx(0.01 + 1500 / 10_000 + 0.004)
    assert model.tpot(ep, batch=3) == pytest.approx(0.02)
    assert model.ttft_fit(ep)[1] == "prior" and model.view(ep)["source"] == "prior"
    model.observe_ttft(ep, 1000, 0, 0.5)
    assert model.ttft_fit(ep)[1] == "own"


def test_a_few_samples_move_a_cpu_server_off_the_gpu_prior():
    model, ep, rng = LatencyModel(), endpoint(), random.Random(3)
    before = model.ttft(ep, 1000, queued=0, batch=0)
    feed(model, ep, CPU, 8, rng)
    after = model.ttft(ep, 1000, queued=0, batch=0)
    want = true_ttft(CPU, 1000, 0)
    assert abs(after - want) / want < 0.25 < abs(before - want) / want


def test_a_cold_endpoint_borrows_a_warm_peers_fit_of_the_same_hardware_class():
    model, rng = LatencyModel(), random.Random(4)
    warm, cold, other = endpoint("w", blocks=2000), endpoint("x", blocks=2000), endpoint("y", blocks=8000)
    feed(model, warm, CPU, 30, rng)
    assert model.ttft_fit(cold)[1] == "peer"
    assert model.ttft(cold, 1000, queued=0, batch=0) == pytest.approx(model.ttft(warm, 1000, queued=0, batch=0))
    assert model.ttft_fit(other)[1] == "prior"  # another cache config: another class
    model.forget(warm)  # it left the pool
    assert model.ttft_fit(cold)[1] == "prior"


def test_a_cold_endpoint_of_another_role_borrows_the_ttft_of_the_same_kv_geometry_but_prefers_its_own_role():
    # a P/D pool: the decode servers prefilled locally and are warm; a prefill server on the same
    # accelerator (same block size and count) predicts with their TTFT until its own fit is warm
    model, rng = LatencyModel(), random.Random(7)
    decode, prefill = endpoint("d", blocks=8000, role="decode"), endpoint("p", blocks=8000, role="prefill")
    cpu_prefill = endpoint("c", blocks=2000, role="prefill")
    feed(model, decode, CPU, 30, rng)  # CPU-like numbers, far from the GPU prior
    assert model.ttft_fit(prefill) == (decode.latency.ttft, "peer")
    assert model.tpot_fit(prefill)[1] == "prior"  # decoding is the role's, not only the accelerator's
    assert model.ttft_fit(cpu_prefill)[1] == "prior"  # another geometry: nothing to borrow
    other_prefill = endpoint("q", blocks=8000, role="prefill")
    feed(model, other_prefill, GPU, 30, rng)
    assert model.ttft_fit(prefill) == (other_prefill.latency.ttft, "peer")  # its own role first
    model.forget(other_prefill)
    model.forget(decode)
    assert model.ttft_fit(prefill)[1] == "prior"


def test_outliers_move_the_fit_by_a_bounded_amount():
    model, ep, rng = LatencyModel(), endpoint(), random.Random(5)
    feed(model, ep, GPU, 400, rng, outliers=0.05)
    assert rel_error(model, ep, GPU) < 0.1
    assert ep.latency.ttft is not None and ep.latency.ttft.clipped > 5


def test_a_server_that_slows_down_is_followed():
    model, ep, rng = LatencyModel(LatencySettings(window=100)), endpoint(), random.Random(6)
    feed(model, ep, GPU, 200, rng)
    slow = {**GPU, "rate": GPU["rate"] / 3}
    feed(model, ep, slow, 400, rng)
    assert rel_error(model, ep, slow) < 0.1


def test_the_disaggregated_ttft_is_the_prefill_the_transfer_and_a_decode_step():
    model = LatencyModel()
    d, p = endpoint("d"), endpoint("p")
    expected = model.ttft(p, 3000) + model.kv_transfer(2500) + model.tpot(d)
    assert model.ttft_disaggregated(d, p, 3000, 2500) == pytest.approx(expected)
    assert model.kv_transfer(0) == 0.0
    prior = model.settings.prior
    assert model.kv_transfer(200_000) == pytest.approx(prior.kv_transfer_overhead_s + 200_000 / prior.kv_transfer_tokens_per_s)


def test_predictions_read_the_queue_ahead_and_the_batch_from_the_endpoint():
    model, ep = LatencyModel(), endpoint()
    ep.in_flight_prefill_tokens, ep.in_flight = 4000, 3
    ep.metrics = Metrics(running=7)
    assert batch_of(ep) == 7
    assert model.ttft(ep, 1000) == pytest.approx(model.ttft(ep, 1000, queued=4000, batch=7))
    assert model.ttft(ep, 1000) > model.ttft(ep, 1000, queued=0, batch=0)


def test_observations_that_are_not_times_teach_nothing():
    model, ep = LatencyModel(), endpoint()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        model.observe_ttft(ep, 100, 0, bad)
        model.observe_tpot(ep, 1, bad)
    assert ep.latency.skipped == 4 and model.view(ep)["samples"] == 0 and model.view(ep)["tpot_samples"] == 0


def test_the_three_feature_fit_solves_the_least_squares_problem():
    # exact data, negligible prior: the solve must recover the coefficients
    f = Fit3((0.5, 0.01, 0.5), (10.0, 10.0), 1e-6, 1.0, 10**9)
    for u, v in [(1, 2), (5, 1), (9, 7), (3, 8), (7, 3), (2, 9)]:
        f.observe(u, v, 0.2 + 0.03 * u + 0.05 * v)
    assert f.coefficients() == pytest.approx((0.2, 0.03, 0.05), rel=1e-4)
    g = Fit2(0.1, 0.1, 10.0, 1e-6, 1.0, 10**9)
    for u in (1, 4, 9):
        g.observe(u, 0.5 + 0.2 * u)
    assert g.coefficients() == pytest.approx((0.5, 0.2), rel=1e-4)


def test_coefficients_stay_physical_when_the_data_says_otherwise():
    f = Fit3((0.02, 1 / 15928, 0.0002), (2048.0, 8.0), 2.0, 0.995, 8)
    rng = random.Random(7)
    for _ in range(200):  # faster with more queued and a bigger batch: noise, not physics
        u, v = rng.uniform(0, 4000), rng.randint(0, 20)
        f.observe(u, v, max(0.001, 0.5 - 0.0001 * u - 0.01 * v))
    c0, c1, c2 = f.coefficients()
    assert c1 >= f.c1_floor * f.ratio > 0 and c2 >= 0 and c0 >= 0


def test_the_tpot_slo_multiset_keeps_the_tightest():
    st = EndpointLatency()
    for slo in (50.0, 20.0, 20.0, 80.0):
        st.add_tpot_slo(slo)
    assert st.min_tpot_slo == 20.0
    st.remove_tpot_slo(20.0)
    assert st.min_tpot_slo == 20.0
    st.remove_tpot_slo(20.0)
    assert st.min_tpot_slo == 50.0
    st.remove_tpot_slo(50.0)
    st.remove_tpot_slo(80.0)
    st.remove_tpot_slo(80.0)  # one too many: harmless
    assert st.min_tpot_slo == 0.0 and st.tpot_slos == {}


def test_settings_are_checked():
    with pytest.raises(ValueError):
        LatencySettings(window=1)
    with pytest.raises(ValueError):
        LatencySettings(prior_weight=0)


def test_the_view_shows_the_fitted_values():
    model, ep, rng = LatencyModel(), endpoint(), random.Random(8)
    feed(model, ep, CPU, 50, rng)
    v = model.view(ep)
    assert v["source"] == "own" and v["samples"] == 50 and v["tpot_samples"] == 50
    assert v["prefill_tokens_per_s"] == pytest.approx(400, rel=0.1)
    assert v["tpot_base_ms"] == pytest.approx(60, rel=0.1)
    assert v["ttft_error_ms"] >= 0 and "last_ttft_ms" in v


def test_the_coefficient_columns_follow_a_cold_endpoints_hardware_class_but_not_every_scrape(monkeypatch):
    # Every scrape brings a new Metrics object. Only a change of hardware class (the cache config
    # scraped at last) can give a cold endpoint another peer: only then is its column resolved again.
    model, rng = LatencyModel(), random.Random(5)
    warm, cold = endpoint("w", blocks=2000), endpoint("x")  # the cold one's cache config not scraped yet
    feed(model, warm, CPU, 30, rng)
    endpoints = (warm, cold)
    values = model.coefficient_columns(endpoints)
    prior_c1 = values[1, 1]
    assert prior_c1 != pytest.approx(values[1, 0])  # the prior's rate, not the warm peer's
    resolved: list[int] = []
    real = LatencyModel._resolve
    monkeypatch.setattr(LatencyModel, "_resolve", lambda self, c, i: (resolved.append(i), real(self, c, i))[1])
    for _ in range(5):  # scrapes of the same class: nothing to resolve
        cold.metrics = Metrics(waiting=rng.randrange(4))
        warm.metrics = Metrics(block_size=16, num_gpu_blocks=2000, running=rng.randrange(8))
        model.coefficient_columns(endpoints)
    assert resolved == []
    cold.metrics = Metrics(block_size=16, num_gpu_blocks=2000)  # now it is known to be of the warm one's class
    values = model.coefficient_columns(endpoints)
    assert resolved == [1]
    assert values[1, 1] == pytest.approx(values[1, 0])  # the peer's fit predicts for it
