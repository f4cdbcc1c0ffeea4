"""Flow control with the real config and policies (pickers.config.flowcontrol, pickers.plugins.flowcontrol)
on the real server (EppServer, Director, RequestStream): the loader's section drives the runtime, the
policies' contracts hold on our bands, and a reloaded flowControl section applies while queued requests
keep their place. No timing: the pool's in-flight counts decide, the TTL timer is read, not awaited."""

from __future__ import annotations

import asyncio
import logging

import pytest

from extproc.handlers.request_stream import RequestStream, State
from extproc.server.runner import EppServer
from pickers.plugins.flowcontrol.program_aware import ProgramAwareFairness
from pickers.plugins.flowcontrol.usage_limits import SoftReflectiveCeiling
from tests.unit.test_config_reload import HEADER, serve, weighted
from tests.unit.test_flowcontrol_runtime import settle
from tests.unit.test_protocol import (
    completion_body,
    response_body_msg,
    response_headers_msg,
    send_request,
)

FAIRNESS = "x-llm-d-inference-fairness-id"


def fc_config(*, fairness: str = "round-robin-fairness-policy", ttl: str = "60s", max_requests: int = 10,
              extra_plugins: str = "", extra: str = "") -> str:  # fmt: skip
    """One request at a time on the two-endpoint pool (concurrency-detector, maxConcurrency 1 each: 2 in flight)."""
    return HEADER + "featureGates: [flowControl]\n" + (
        "plugins:\n- type: queue-scorer\n- type: max-score-picker\n"
        f"- type: {fairness}\n- {{type: concurrency-detector, name: busy, parameters: {{maxConcurrency: 1}}}}\n" + extra_plugins
        + "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: queue-scorer}\n  - {pluginRef: max-score-picker}\n"
        f"flowControl:\n  defaultRequestTTL: {ttl}\n  saturationDetector: {{pluginRef: busy}}\n"
        f"  defaultPriorityBand: {{maxRequests: {max_requests}, fairnessPolicyRef: {fairness}}}\n" + extra
    )  # fmt: skip


async def start(server: EppServer, **headers: str) -> tuple[RequestStream, asyncio.Task]:
    stream = RequestStream(server.director, parsers=server.servicer.parsers)
    assert send_request(stream, completion_body(stream=True), extra=headers or None) == []
    assert stream.state is State.PREPARING
    await server.director.prepare(stream.request)
    return stream, asyncio.ensure_future(server.director.admit(stream, None))


def end(stream: RequestStream) -> None:
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\ndata: [DONE]\n\n', True))


def flows(server: EppServer) -> dict[int, list[str]]:
    fc = server.flow_control
    assert fc is not None
    return {p: [q.flow.id for q in b.queues()] for p, b in fc.bands.items() if b.count}


async def test_the_loaders_section_drives_the_runtime_and_round_robin_survives_flows_leaving(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(fc_config())
    server = serve(path)
    fc = server.flow_control
    assert fc is not None and fc.config is server.config.flow_control  # type: ignore[union-attr]
    running = [await start(server, **{FAIRNESS: "warm"}) for _ in range(2)]  # both endpoints busy
    await settle()
    assert all(t.done() for _, t in running)
    waiting = {}
    for tenant, n in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(n):
            waiting[f"{tenant}{i}"] = await start(server, **{FAIRNESS: tenant})
    await settle()
    assert flows(server) == {0: ["a", "b", "c"]} and fc.count == 6
    band = fc.bands[0]
    assert band.ordering is band.config.ordering and band.ordering.type == "fcfs-ordering-policy"
    order = []
    served = list(running)
    while fc.count:
        end(served.pop(0)[0])  # one ends: one dispatches
        await settle()
        done = [k for k, (s, t) in waiting.items() if t.done() and k not in order]
        assert len(done) == 1, done
        order.append(done[0])
        served.append(waiting[done[0]])
    assert order == ["a0", "b0", "c0", "a1", "c1", "a2"]  # b left after one, c after two: the turn goes on
    assert fc.bands[0].count == 0 and not list(fc.bands[0].queues())  # empty flows removed


async def test_soft_reflective_ceilings_are_asked_once_per_dispatch_cycle_and_no_endpoints_is_saturated(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(fc_config(extra_plugins="- type: soft-reflective-ceiling-policy\n", extra="  usageLimitPolicyPluginRef: soft-reflective-ceiling-policy\n"))
    server = serve(path)
    fc = server.flow_control
    assert fc is not None
    policy = fc.config.usage_limit
    assert isinstance(policy, SoftReflectiveCeiling)
    calls = []
    real = policy.ceilings
    policy.ceilings = lambda s, p: calls.append((s, tuple(p))) or real(s, p)  # type: ignore[method-assign]
    a = await start(server)
    await settle()
    assert a[1].done() and calls == [(0.0, (0,))]  # one cycle: one call, one dispatch
    assert fc.config.saturation_detector.saturation([]) == 1.0


async def test_program_aware_fairness_is_told_of_dispatches_and_completions(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(fc_config(fairness="program-aware-fairness"))
    server = serve(path)
    paf = server.config.plugins["program-aware-fairness"]  # type: ignore[union-attr]
    assert isinstance(paf, ProgramAwareFairness)
    assert paf in server.scheduler.plugins  # a pre-request / response-complete plugin of the cycle
    streams = [await start(server, **{FAIRNESS: "prog"}) for _ in range(3)]
    await settle()
    assert paf.programs["prog"].dispatched == 2 and paf.programs["prog"].in_flight == 2
    end(streams[0][0])
    await settle()
    prog = paf.programs["prog"]
    assert prog.dispatched == 3 and prog.waits >= 1 and prog.service == pytest.approx(3 + 2 * 2, rel=1e-3)  # 1 x prompt + 2 x completion (decaying)


async def test_a_reloaded_section_applies_to_new_arrivals_and_queued_requests_keep_their_place(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(fc_config(max_requests=3))
    server = serve(path)
    fc = server.flow_control
    assert fc is not None and server.reloader is not None
    running = [await start(server) for _ in range(2)]
    queued = [await start(server, **{FAIRNESS: t}) for t in ("b", "a", "b")]
    await settle()
    assert fc.count == 3 and fc.bands[0].config.max_requests == 3
    old_ordering = fc.bands[0].queue("b")._key  # type: ignore[union-attr]
    path.write_text(fc_config(max_requests=5, ttl="90s", fairness="global-strict-fairness-policy",
                              extra="  priorityBands:\n  - {priority: 10, maxRequests: 1}\n"))  # fmt: skip
    assert await server.reloader.poll_once()
    assert fc.config is server.flow_control_config and fc.bands[0].config.max_requests == 5
    assert fc.bands[0].config.fairness.type == "global-strict-fairness-policy" and 10 in fc.bands
    assert fc.count == 3 and flows(server) == {0: ["b", "a"]}  # nobody dropped or moved
    assert fc.bands[0].queue("b")._key is old_ordering  # type: ignore[union-attr]  # the flow keeps its order
    assert all(i.ttl == 90.0 for i in fc._waiting.values())
    more = [await start(server) for _ in range(2)]  # the new bound (5) admits two more
    await settle()
    assert fc.count == 5
    order = []
    everyone = {id(s): n for n, (s, _) in enumerate(queued + more)}
    served = list(running)
    while fc.count:
        end(served.pop(0)[0])
        await settle()
        for s, t in queued + more:
            if t.done() and everyone[id(s)] not in order:
                order.append(everyone[id(s)])
                served.append((s, t))
    assert order == [0, 1, 2, 3, 4]  # global strict fcfs: arrival order across flows


async def test_turning_flow_control_on_or_off_by_a_reload_is_refused(tmp_path, caplog):
    path = tmp_path / "epp.yaml"
    path.write_text(fc_config())
    server = serve(path)
    assert server.reloader is not None
    fc = server.flow_control
    with caplog.at_level(logging.ERROR, logger="extproc.server.reload"):
        path.write_text(weighted(1, 1))  # no gate, no section
        assert not await server.reloader.poll_once()
    assert "flowControl turned off" in caplog.text and server.flow_control is fc and fc.config is server.config.flow_control  # type: ignore[union-attr]
    assert server.metrics.config_reloads == {"success": 0, "error": 1}
    off = tmp_path / "off.yaml"
    off.write_text(weighted(1, 1))
    server = serve(off)
    assert server.flow_control is None and server.reloader is not None
    off.write_text(fc_config())
    assert not await server.reloader.poll_once()
    assert "flowControl turned on" in server.reloader.status()["last_error"]
