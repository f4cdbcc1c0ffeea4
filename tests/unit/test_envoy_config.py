"""The generated Envoy configurations are accepted by the real Envoy (`--mode validate`)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from extproc.devstack import envoy_config
from extproc.devstack.stack import envoy_binary
from extproc.handlers.request_stream import DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEADERS_KB
from pickers.framework.errors import ConfigError

POOL = [("127.0.0.1", 8001), ("127.0.0.1", 8002)]


def validate(cfg: dict, tmp_path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "settings",
    [
        envoy_config.GatewaySettings(listen_port=8081, epp_port=9002, admin_port=19000),
        envoy_config.GatewaySettings(listen_port=8081, epp_port=9002, admin_port=19000, request_body_mode="BUFFERED"),
        envoy_config.GatewaySettings(
            listen_port=8081, epp_port=9002, admin_port=19000, failure_mode_allow=True, fallback_endpoints=POOL, access_log_path="/tmp/a.log"
        ),
        envoy_config.GatewaySettings(listen_port=8081, epp_port=9002, admin_port=19000, override_host_endpoints=POOL),
        envoy_config.GatewaySettings(
            listen_port=8081, epp_port=9002, admin_port=19000, failure_mode_allow=True, fallback_endpoints=POOL, closed_prefixes=("/sim/",)
        ),
        envoy_config.GatewaySettings(listen_port=8081, epp_port=9002, admin_port=19000, dns_destinations=True),
        envoy_config.GatewaySettings(listen_port=8081, epp_port=9002, admin_port=19000, epp_replicas=[(9002, 9003), (9012, 9013)]),
    ],
    ids=["full-duplex", "buffered", "fail-open", "override-host", "closed-prefixes", "dns-destinations", "epp-replicas"],
)
def test_generated_config_is_valid_for_envoy(settings, tmp_path):
    validate(envoy_config.render(settings), tmp_path)


def test_reference_file_is_valid_as_shipped(tmp_path):
    validate(yaml.safe_load(envoy_config.REFERENCE.read_text()), tmp_path)


def test_direct_baseline_is_valid(tmp_path):
    validate(envoy_config.render_direct(8081, 19000, POOL, closed_prefixes=("/sim/",)), tmp_path)


def hcm_of(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_reference_header_limits_leave_headroom_over_the_epps():
    # Envoy checks them again after the EPP's mutation, and closes the connection without an answer
    # past them: the EPP's limits must be lower, so that it answers 431 first.
    hcm = hcm_of(yaml.safe_load(envoy_config.REFERENCE.read_text()))
    assert hcm["common_http_protocol_options"]["max_headers_count"] >= DEFAULT_MAX_HEADERS + 20
    assert hcm["max_request_headers_kb"] >= DEFAULT_MAX_HEADERS_KB + 20


@pytest.mark.parametrize("fail_open", [False, True])
def test_closed_prefixes_are_answered_404_by_envoy_before_any_other_route(fail_open):
    settings = envoy_config.GatewaySettings(
        listen_port=1, epp_port=2, admin_port=3, failure_mode_allow=fail_open, fallback_endpoints=POOL, closed_prefixes=("/sim/",)
    )
    first = hcm_of(envoy_config.render(settings))["route_config"]["virtual_hosts"][0]["routes"][0]
    assert first["match"] == {"prefix": "/sim/"}
    assert first["direct_response"]["status"] == 404
    assert first["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True  # the EPP is not asked


def test_failure_mode_is_a_setting():
    for allow in (True, False):
        cfg = envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, failure_mode_allow=allow))
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
        assert ext["typed_config"]["failure_mode_allow"] is allow


def test_unknown_body_mode_is_refused():
    with pytest.raises(ConfigError, match="FULL_DUPLEX_STREAMED"):
        envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, request_body_mode="STREAMED"))


@pytest.mark.parametrize("override_host", [False, True])
def test_no_cluster_caps_concurrent_streams_at_envoys_1024_default(override_host):
    # Each request holds a pool connection/request and an ext_proc stream for its whole life.
    settings = envoy_config.GatewaySettings(
        listen_port=1, epp_port=2, admin_port=3, failure_mode_allow=True, fallback_endpoints=POOL,
        override_host_endpoints=POOL if override_host else (),
    )  # fmt: skip
    clusters = envoy_config.render(settings)["static_resources"]["clusters"]
    direct = envoy_config.render_direct(1, 3, POOL)["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} == {"llm-pool", "llm-epp", "llm-pool-fallback"}
    for c in [*clusters, *direct]:
        (limits,) = c["circuit_breakers"]["thresholds"]
        for key in ("max_connections", "max_pending_requests", "max_requests"):
            assert limits[key] >= 10_000, (c["name"], key)
    epp = next(c for c in clusters if c["name"] == "llm-epp")
    assert epp["circuit_breakers"]["thresholds"][0]["max_retries"] >= 10_000  # every stream of a dead EPP retries at once


def test_an_ext_proc_stream_that_broke_before_the_epp_answered_is_retried_on_another_epp():
    settings = envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, epp_replicas=((2, 3), (4, 5)))
    retry = _ext_proc_of(envoy_config.render(settings))["grpc_service"]["retry_policy"]
    assert {"reset", "connect-failure", "refused-stream"} <= set(retry["retry_on"].split(","))
    assert retry["num_retries"] >= 1
    assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]


def _ext_proc_of(cfg: dict) -> dict:
    return next(f for f in hcm_of(cfg)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


def test_flow_control_raises_message_timeout_above_the_longest_queue_wait(tmp_path):
    base = {"listen_port": 1, "epp_port": 2, "admin_port": 3}
    off = envoy_config.render(envoy_config.GatewaySettings(**base))
    assert _ext_proc_of(off)["message_timeout"] == "10s" and "stream_idle_timeout" not in hcm_of(off)
    on = envoy_config.render(envoy_config.GatewaySettings(**base, flow_control_ttl=60.0))
    assert _ext_proc_of(on)["message_timeout"] == "70s" and "stream_idle_timeout" not in hcm_of(on)
    long = envoy_config.render(envoy_config.GatewaySettings(**base, flow_control_ttl=600.0))
    assert _ext_proc_of(long)["message_timeout"] == "610s" and hcm_of(long)["stream_idle_timeout"] == "610s"
    unbounded = envoy_config.render(envoy_config.GatewaySettings(**base, flow_control_ttl=0.0))
    assert _ext_proc_of(unbounded)["message_timeout"] == "3610s"
    kept = envoy_config.render(envoy_config.GatewaySettings(**base, flow_control_ttl=5.0, message_timeout="120s"))
    assert _ext_proc_of(kept)["message_timeout"] == "120s"  # already longer: kept
    validate(long, tmp_path)


def test_host_name_destinations_go_through_the_dynamic_forward_proxy():
    # ORIGINAL_DST takes only an ip:port in x-gateway-destination-endpoint (a host name: 503 "no healthy
    # upstream"); a cluster-scoped EPP names peer gateways by host name
    cfg = envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, dns_destinations=True))
    hcm = hcm_of(cfg)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.dynamic_forward_proxy") < names.index(
        "envoy.filters.http.router"
    )
    route = next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r.get("name") == "picked-by-epp")
    per_route = route["typed_per_filter_config"]["envoy.filters.http.dynamic_forward_proxy"]
    assert per_route["host_rewrite_header"] == "x-gateway-destination-endpoint"
    pool = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "llm-pool")
    assert pool["cluster_type"]["name"] == "envoy.clusters.dynamic_forward_proxy" and "original_dst_lb_config" not in pool
    assert pool["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    with pytest.raises(ConfigError, match="override-host"):
        envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, dns_destinations=True,
                                                         override_host_endpoints=POOL))  # fmt: skip


def test_epp_replicas_are_one_cluster_balanced_by_least_request_each_health_checked():
    cfg = envoy_config.render(envoy_config.GatewaySettings(listen_port=1, epp_port=2, admin_port=3, epp_replicas=[(9002, 9003), (9012, 9013)]))
    epp = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "llm-epp")
    assert epp["lb_policy"] == "LEAST_REQUEST"
    hosts = [e["endpoint"] for e in epp["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [(h["address"]["socket_address"]["port_value"], h["health_check_config"]["port_value"]) for h in hosts] == [(9002, 9003), (9012, 9013)]
    assert epp["health_checks"] and epp["outlier_detection"]["consecutive_local_origin_failure"] == 1
