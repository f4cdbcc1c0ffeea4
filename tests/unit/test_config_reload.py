"""Config hot reload (extproc.server.reload): a changed --config-file is swapped in between requests,
routed requests finish on what routed them, unchanged plugins keep their state, and a bad or refused
edit keeps the last good config. The poll is driven directly: no sleeps, no timing."""

from __future__ import annotations

import logging
import os
import time

import pytest

from extproc.cli.main import build_parser
from extproc.handlers.request_stream import RequestStream
from extproc.server.reload import DEFAULT_INTERVAL
from extproc.server.runner import EppServer, ServeOptions
from pickers.config.loader import load_config
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.plugins.base import PluginContext
from tests.unit.test_protocol import (
    completion_body,
    headers_msg,
    response_body_msg,
    response_headers_msg,
    send_request,
)

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
IDLE, BUSY = "10.0.0.1:8000", "10.0.0.2:8000"  # idle queue but a full KV cache / a long queue but an empty cache


def weighted(queue: float, kv: float, *, extra: str = "", profile: str = "default") -> str:
    """queue-scorer prefers IDLE, kv-cache-utilization-scorer BUSY: the weights decide."""
    return HEADER + (
        "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: max-score-picker\n" + extra
        + f"schedulingProfiles:\n- name: {profile}\n  plugins:\n"
        f"  - {{pluginRef: queue-scorer, weight: {queue}}}\n  - {{pluginRef: kv-cache-utilization-scorer, weight: {kv}}}\n"
        "  - {pluginRef: max-score-picker}\n"
    )  # fmt: skip


def serve(path, **kw) -> EppServer:  # type: ignore[no-untyped-def]
    server = EppServer(ServeOptions(config_file=str(path), admin_port=0, **kw))
    ds = server.datastore
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], 8000) for a in (IDLE, BUSY))
    now = time.monotonic()
    ds.update_metrics(IDLE, Metrics(waiting=0, kv_usage=0.9, updated_at=now))
    ds.update_metrics(BUSY, Metrics(waiting=10, kv_usage=0.0, updated_at=now))
    return server


def route(server: EppServer, prompt: str = "Hello there", **headers: str) -> RequestStream:
    """A request routed through the server's Director and parsers, its response not yet come."""
    stream = RequestStream(server.director, parsers=server.servicer.parsers)
    send_request(stream, completion_body(prompt), extra=headers or None)
    assert stream.routing is not None
    return stream


def finish(stream: RequestStream) -> None:
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}', True))
    stream.close()


async def test_a_weight_change_takes_the_next_request_while_a_routed_one_finishes_on_the_old_profile(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1, profile="before"))
    server = serve(path)
    old = server.scheduler
    in_flight = route(server)
    assert in_flight.routing is not None and in_flight.routing.primary.address == IDLE
    completed: list[str] = []
    old.response_complete = lambda request, endpoint, *_: completed.append(endpoint.address)  # type: ignore[method-assign]

    path.write_text(weighted(1, 3, profile="after"))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]

    assert server.director.scheduler is server.scheduler is not old
    nxt = route(server)
    assert nxt.routing is not None and (nxt.routing.primary.address, nxt.routing.profile) == (BUSY, "after")
    assert in_flight.routing.profile == "before" and in_flight.routing.scheduler is old
    finish(in_flight)
    assert completed == [IDLE]  # the old scheduler's plugins hear of the request they routed
    finish(nxt)
    assert completed == [IDLE] and server.datastore.total_in_flight() == 0


async def test_the_shared_prefix_index_survives_a_reload(tmp_path):
    path = tmp_path / "epp.yaml"
    plugins = HEADER + "plugins:\n- type: queue-scorer\n- {}\n"  # no profiles: one of every plugin, weight 1
    path.write_text(plugins.format("type: prefix-cache-scorer"))
    server = serve(path)
    finish(route(server, "a long shared system prompt " * 100))
    held = server.prefix_index.size()
    assert held > 0
    path.write_text(plugins.format("{type: prefix-cache-scorer, parameters: {lruCapacityPerServer: 1000}}"))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    assert server.config is not None
    rebuilt = server.reloader.current.plugins["prefix-cache-scorer"]  # type: ignore[union-attr]
    assert rebuilt.index is server.prefix_index and server.prefix_index.size() == held  # type: ignore[attr-defined]


async def test_an_unchanged_plugin_keeps_its_state_and_a_changed_one_is_rebuilt(tmp_path):
    session = "- {type: session-affinity-scorer, parameters: {strategy: session_id}}\n"
    path = tmp_path / "epp.yaml"
    config = weighted(1, 3, extra=session).replace("  - {pluginRef: max-score-picker}", "  - {pluginRef: session-affinity-scorer, weight: 100}\n  - {pluginRef: max-score-picker}")
    path.write_text(config.replace("weight: 3", "weight: 0"))  # queue decides: IDLE
    server = serve(path)
    first = route(server, **{"x-session-id": "s1"})
    assert first.routing is not None and first.routing.primary.address == IDLE
    finish(first)
    old_plugins = dict(server.reloader.current.plugins)  # type: ignore[union-attr]

    path.write_text(config.replace("- type: queue-scorer", "- {type: queue-scorer, parameters: {}}"))  # kv would pick BUSY
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    new = server.reloader.current  # type: ignore[union-attr]
    assert "session-affinity-scorer" in new.kept and "queue-scorer" not in new.kept
    kept = new.plugins["session-affinity-scorer"]
    assert kept is not old_plugins["session-affinity-scorer"]  # a copy: the old one is left to its requests
    assert kept._bindings is old_plugins["session-affinity-scorer"]._bindings  # type: ignore[attr-defined]
    again = route(server, **{"x-session-id": "s1"})
    assert again.routing is not None and again.routing.primary.address == IDLE  # the session binding survived
    assert route(server).routing.primary.address == BUSY  # type: ignore[union-attr]
    assert server.config_status()["kept_plugins"] == list(new.kept)


def test_a_reload_rebinds_the_copy_and_leaves_the_serving_instance_alone():
    ctx = PluginContext()
    before = HEADER + "plugins:\n- {type: prefix-cache-scorer, parameters: {blockSize: 64}}\n- type: no-hit-lru-scorer\n"
    old = load_config(before, "a.yaml", ctx)
    new = load_config(before.replace("blockSize: 64", "blockSize: 32"), "a.yaml", ctx, previous=old)
    assert new.kept == ("no-hit-lru-scorer",)
    old_lru, new_lru = old.plugins["no-hit-lru-scorer"], new.plugins["no-hit-lru-scorer"]
    assert (old_lru.block_chars, new_lru.block_chars) == (64, 32)  # type: ignore[attr-defined]
    assert new_lru._cold_picks is old_lru._cold_picks  # type: ignore[attr-defined]


async def test_a_bad_edit_keeps_the_last_good_config_and_reports_it_once(tmp_path, caplog):
    path = tmp_path / "epp.yaml"
    good = weighted(3, 1)
    path.write_text(good)
    server = serve(path)
    reloader, scheduler = server.reloader, server.scheduler
    assert reloader is not None
    with caplog.at_level(logging.ERROR, logger="extproc.server.reload"):
        path.write_text(good + "plugins: [oops\n")
        assert not await reloader.poll_once()
        path.write_text(good + "plugins: [oops\n")  # the same text again: nothing new to say
        assert not await reloader.poll_once()
        said = [r.getMessage() for r in caplog.records if r.name == "extproc.server.reload"]
        assert len(said) == 1 and "keeping the last good config" in said[0]
        assert server.metrics.config_reloads == {"success": 0, "error": 1}
        path.write_text(good.replace("type: queue-scorer", "type: no-such-scorer"))
        assert not await reloader.poll_once()
        assert len([r for r in caplog.records if r.name == "extproc.server.reload"]) == 2
    status = server.config_status()
    assert status["source"] == str(path) and "no-such-scorer" in status["last_error"] and status["last_error_at"] is not None
    assert server.scheduler is scheduler and route(server).routing.primary.address == IDLE  # type: ignore[union-attr]

    path.write_text(weighted(1, 3))
    assert await reloader.poll_once()
    assert server.config_status()["last_error"] is None and server.metrics.config_reloads == {"success": 1, "error": 2}
    text = server.metrics.exposition().decode()
    assert 'llm_epp_config_reloads_total{result="success"} 1.0' in text
    assert f'llm_epp_config_info{{hash="{reloader.status()["sha256"]}",source="{path}"}} 1.0' in text


async def test_a_file_emptied_mid_swap_keeps_serving(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    path.write_text("")
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "empty" in server.config_status()["last_error"]
    path.write_text(weighted(1, 3))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]


async def test_deleting_the_file_keeps_serving_and_its_return_clears_the_error(tmp_path):
    path = tmp_path / "epp.yaml"
    good = weighted(3, 1)
    path.write_text(good)
    server = serve(path)
    scheduler = server.scheduler
    path.unlink()
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]  # still gone: counted once
    assert "not found" in server.config_status()["last_error"] and server.metrics.config_reloads["error"] == 1
    assert server.scheduler is scheduler and route(server).routing.primary.address == IDLE  # type: ignore[union-attr]
    path.write_text(good)  # the same config back: nothing to apply
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert server.config_status()["last_error"] is None and server.scheduler is scheduler


async def test_a_configmap_symlink_swap_is_seen(tmp_path):
    # A mounted ConfigMap: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>/; an update writes a
    # new timestamped directory and renames a new ..data link over the old one, atomically.
    first = tmp_path / "..2024_01_01_00_00_00.1"
    first.mkdir()
    (first / "config.yaml").write_text(weighted(3, 1))
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    server = serve(tmp_path / "config.yaml")
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]  # a recent mtime: read again, unchanged

    second = tmp_path / "..2024_01_01_00_01_00.2"
    second.mkdir()
    (second / "config.yaml").write_text(weighted(1, 3))
    os.symlink(second.name, tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    (first / "config.yaml").unlink()
    first.rmdir()
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    assert route(server).routing.primary.address == BUSY  # type: ignore[union-attr]


async def test_what_start_up_wires_is_refused_whole(tmp_path, caplog):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    scheduler, parsers = server.scheduler, server.servicer.parsers
    with caplog.at_level(logging.ERROR, logger="extproc.server.reload"):
        path.write_text(weighted(1, 3) + "dataLayer: {injectDefaults: false}\n")  # the weights and the data layer
        assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "restart the EPP to change dataLayer" in caplog.text
    assert server.scheduler is scheduler and server.servicer.parsers is parsers  # nothing of it applied
    assert server.metrics.config_reloads == {"success": 0, "error": 1}


async def test_a_new_token_producer_is_refused(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    path.write_text(weighted(3, 1, extra="- type: token-producer\n"))
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "token-producer" in server.config_status()["last_error"]


async def test_request_parsers_change_for_streams_opened_after_the_reload(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    assert server.servicer.parsers.resolve("/v1/completions") is not None
    path.write_text(weighted(3, 1, extra="- type: anthropic-parser\nrequestHandler:\n  parsers:\n  - {pluginRef: anthropic-parser}\n"))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    assert server.servicer.parsers.resolve("/v1/completions") is None
    stream = RequestStream(server.director, parsers=server.servicer.parsers)
    out = stream.handle(headers_msg())
    assert out[0].immediate_response.status.code == 400  # no parser claims it any more


def test_reload_can_be_turned_off_and_needs_a_file(tmp_path):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    assert serve(path, config_reload_interval=0).reloader is None
    assert serve(path, config_reload_interval=0).config_status() == {"source": str(path), "watch": "off"}
    inline = EppServer(ServeOptions(config_text=weighted(3, 1)))
    assert inline.reloader is None and inline.config_status()["watch"] == "n/a"


def test_the_flag_defaults_to_the_reloader_interval():
    args = build_parser().parse_args(["serve", "--config-file", "x.yaml"])
    assert args.config_reload_interval == DEFAULT_INTERVAL
    assert build_parser().parse_args(["serve", "--config-reload-interval", "0"]).config_reload_interval == 0


@pytest.mark.parametrize("text", ["", "kind: nope\n"])
async def test_a_reloader_never_raises_into_its_task(tmp_path, text):
    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    path.write_text(text)
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]


async def test_debug_config_and_epp_status_show_the_config_serving_and_the_last_error(tmp_path):
    import asyncio
    import io

    from aiohttp.test_utils import TestClient, TestServer

    from extproc.cli.status import show_status
    from extproc.server.admin import admin_app

    path = tmp_path / "epp.yaml"
    path.write_text(weighted(3, 1))
    server = serve(path)
    path.write_text("kind: nope\n")
    await server.reloader.poll_once()  # type: ignore[union-attr]
    app = admin_app(server.datastore, server.prefix_index, server.director, {"version": "t"}, None, server.config_status)
    async with TestClient(TestServer(app)) as client:
        state = (await (await client.get("/debug/config")).json())["config_reload"]
        out = io.StringIO()
        assert await asyncio.to_thread(show_status, str(client.make_url("")).rstrip("/"), out=out) == 0
    assert state["source"] == str(path) and len(state["sha256"]) == 64 and "apiVersion" in state["last_error"]
    first, second = out.getvalue().splitlines()[:2]
    assert first.startswith(f"config: {path} (sha256 {state['sha256'][:12]}, loaded ") and "0 applied, 1 failed" in first
    assert second.startswith("last reload error (") and "the config above still serves" in second


async def test_an_unchanged_token_producer_is_carried_over_and_a_changed_one_refused(tmp_path):
    path = tmp_path / "epp.yaml"
    tokens = "- {type: token-producer, parameters: {modelName: m}}\n"
    path.write_text(weighted(3, 1, extra=tokens))
    server = serve(path)
    assert len(server.director.token_producers) == 1
    path.write_text(weighted(1, 3, extra=tokens))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    (carried,) = server.director.token_producers
    assert "token-producer" in server.reloader.current.kept  # type: ignore[union-attr]
    path.write_text(weighted(1, 3, extra=tokens.replace("modelName: m", "modelName: other")))
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "token-producer" in server.config_status()["last_error"] and server.director.token_producers == (carried,)


async def test_a_precise_index_fed_by_kv_events_is_kept_whole_or_the_edit_refused(tmp_path):
    path = tmp_path / "epp.yaml"
    precise = "- type: precise-prefix-cache-producer\n"
    path.write_text(weighted(3, 1, extra=precise))
    server = serve(path)
    index = server.reloader.current.plugins["precise-prefix-cache-producer"].index  # type: ignore[union-attr,attr-defined]
    path.write_text(weighted(1, 3, extra=precise))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    assert server.reloader.current.plugins["precise-prefix-cache-producer"].index is index  # type: ignore[union-attr,attr-defined]
    scheduler = server.scheduler
    path.write_text(weighted(3, 1, extra="- {type: precise-prefix-cache-producer, parameters: {kvEventsConfig: {topicFilter: x}}}\n"))
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "KV events" in server.config_status()["last_error"] and server.scheduler is scheduler
