"""Generate the Envoy configuration for a local gateway from the reference file envoy/llm-gateway.yaml.

The reference file is the one template: we load it and set ports, body modes and the failure mode,
and with fail-open add a route to a cluster of the pool's own endpoints (Envoy's
`failure_mode_allow` alone does not fail open with an ORIGINAL_DST cluster: docs/kubernetes.md, Failure mode).
For a cluster-scoped EPP, whose destinations are peer gateways' host names, the pool cluster becomes a
dynamic forward proxy (ORIGINAL_DST takes IP addresses only: docs/kubernetes.md, Routing across clusters).
Paths that are not for clients (the simulators' control API in the local stack) get a 404 from
Envoy itself, before the EPP is asked.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pickers.config import safe_yaml
from pickers.framework.errors import ConfigError

REFERENCE = Path(__file__).resolve().parents[2] / "envoy" / "llm-gateway.yaml"
BODY_MODES = ("FULL_DUPLEX_STREAMED", "BUFFERED")
RESPONSE_BODY_MODES = ("FULL_DUPLEX_STREAMED", "STREAMED", "BUFFERED", "NONE")


@dataclass(slots=True)
class GatewaySettings:
    listen_port: int
    epp_port: int
    admin_port: int
    listen_address: str = "127.0.0.1"
    epp_host: str = "127.0.0.1"
    # The EPP's gRPC health port: Envoy health-checks the EPP there so it knows at once when the EPP
    # is down or draining (see the llm-epp cluster in the reference file). 0: no active health check.
    epp_health_port: int = 9003
    # Several EPP replicas (port, health port) instead of epp_port: Envoy spreads the streams with
    # LEAST_REQUEST and stops sending to one that fails its health check or refuses a connection.
    epp_replicas: Sequence[tuple[int, int]] = ()
    # ext_proc over TLS (`epp serve --secure-serving`). Without a CA the EPP's certificate is not
    # verified (the reference picker's self-signed default); with one, it must chain to it.
    epp_tls: bool = False
    epp_tls_ca: str | None = None  # PEM file
    epp_tls_sni: str = ""
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    response_body_mode: str = "FULL_DUPLEX_STREAMED"
    failure_mode_allow: bool = False
    message_timeout: str = "10s"
    # Flow control's longest queue wait in seconds (the largest of defaultRequestTTL and the no-endpoint
    # TTL; 0: no limit); None: flow control off. A queued request's ext_proc stream gets no answer while
    # it waits, so message_timeout (and the stream idle timeout, 5 min by default) must outlast it.
    flow_control_ttl: float | None = None
    access_log_path: str | None = None  # None: stdout, as in the reference file
    # Route with Envoy's override-host policy over a cluster of these endpoints instead of
    # ORIGINAL_DST: it understands the EPP's ordered list and retries on the next endpoint.
    override_host_endpoints: Sequence[tuple[str, int]] = field(default_factory=tuple)
    retries: int = 2
    # The EPP's destinations are host names (a cluster-scoped EPP's peer gateways, `host:port`): route
    # with Envoy's dynamic forward proxy, which resolves them, instead of ORIGINAL_DST (IP addresses only).
    dns_destinations: bool = False
    # With failure_mode_allow: where to send requests when the EPP cannot answer.
    fallback_endpoints: Sequence[tuple[str, int]] = field(default_factory=tuple)
    # Path prefixes the gateway answers with 404 itself, e.g. the simulators' /sim/ control API:
    # reachable on each server's own port, never by a client through the gateway.
    closed_prefixes: Sequence[str] = ()
    # Streams per HTTP/2 connection to the EPP before Envoy opens a new one (0: no limit). Each Envoy
    # worker thread holds one connection; with `epp serve --workers N` the kernel hands each new
    # connection to one EPP worker (SO_REUSEPORT), so connections that turn over keep every worker
    # fed even with few Envoy threads (docs/scaling.md).
    epp_max_requests_per_connection: int = 0
    # Concurrent streams per connection to the EPP (HTTP/2 max_concurrent_streams; 0: Envoy's default,
    # unbounded): past it Envoy opens another connection, so even one Envoy thread's requests reach
    # several EPP workers at once.
    epp_streams_per_connection: int = 0


UNBOUNDED_QUEUE_WAIT = 3600.0  # seconds allowed when flow control's TTL is 0 (wait until the client goes)
PICK_MARGIN = 10.0  # seconds past the queue wait for the pick and the answer
ENVOY_STREAM_IDLE_TIMEOUT = 300.0  # Envoy's default, which the reference file keeps


def _duration(text: str) -> float:
    """An Envoy duration as seconds ("10s", "1.5s", "500ms"); unreadable: 0, so it is replaced."""
    t = text.strip()
    try:
        return float(t[:-2]) / 1000 if t.endswith("ms") else float(t.rstrip("s"))
    except ValueError:
        return 0.0


def render(settings: GatewaySettings, reference: Path = REFERENCE) -> dict[str, Any]:
    if settings.request_body_mode not in BODY_MODES:
        raise ConfigError(f"expected one of {', '.join(BODY_MODES)}, got {settings.request_body_mode!r}", field="request body mode")
    if settings.response_body_mode not in RESPONSE_BODY_MODES:
        raise ConfigError(
            f"expected one of {', '.join(RESPONSE_BODY_MODES)}, got {settings.response_body_mode!r}", field="response body mode"
        )
    cfg = safe_yaml.load(reference, what="Envoy reference config")
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": settings.admin_port}
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": settings.listen_address, "port_value": settings.listen_port}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if settings.access_log_path:
        log = hcm["access_log"][0]
        log["name"] = "envoy.access_loggers.file"
        log["typed_config"] = {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": settings.access_log_path,
            "log_format": log["typed_config"]["log_format"],
        }
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    ext_proc["failure_mode_allow"] = settings.failure_mode_allow
    ext_proc["message_timeout"] = settings.message_timeout
    if settings.flow_control_ttl is not None:
        wait = (settings.flow_control_ttl or UNBOUNDED_QUEUE_WAIT) + PICK_MARGIN
        if _duration(settings.message_timeout) < wait:
            ext_proc["message_timeout"] = f"{wait:g}s"
        if wait > ENVOY_STREAM_IDLE_TIMEOUT:
            hcm["stream_idle_timeout"] = f"{wait:g}s"
    mode = ext_proc["processing_mode"]
    mode["request_body_mode"] = settings.request_body_mode
    mode["response_body_mode"] = settings.response_body_mode
    clusters = cfg["static_resources"]["clusters"]
    epp = next(c for c in clusters if c["name"] == "llm-epp")
    epp_endpoint = epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    epp_endpoint["address"]["socket_address"] = {"address": settings.epp_host, "port_value": settings.epp_port}
    if settings.epp_health_port:
        epp_endpoint["health_check_config"] = {"port_value": settings.epp_health_port}
    else:
        del epp["health_checks"]
        epp_endpoint.pop("health_check_config", None)
    if settings.epp_replicas:
        lb = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
        template = lb[0]
        lb[:] = []
        for port, health in settings.epp_replicas:
            ep = copy.deepcopy(template)
            ep["endpoint"]["address"]["socket_address"]["port_value"] = port
            if settings.epp_health_port:
                ep["endpoint"]["health_check_config"] = {"port_value": health}
            lb.append(ep)
        epp["lb_policy"] = "LEAST_REQUEST"
        # A replica that stops answering (frozen, a partition) holds the streams it has, and in full
        # duplex no message_timeout runs while the EPP holds the body: HTTP/2 pings find it within ~2 s
        # and close its connection, so those streams end (failing open, or a 500) instead of waiting on
        # it, while the other replica takes the new ones.
        h2 = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        h2["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"] = {"interval": "1s", "timeout": "1s"}
    if settings.epp_tls:
        _epp_tls(epp, settings)
    options = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    if settings.epp_max_requests_per_connection:
        options.setdefault("common_http_protocol_options", {})["max_requests_per_connection"] = settings.epp_max_requests_per_connection
    if settings.epp_streams_per_connection:
        options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = settings.epp_streams_per_connection
    if settings.override_host_endpoints and settings.dns_destinations:
        raise ConfigError("the override-host policy matches IP addresses; host-name destinations need the dynamic forward proxy",
                          field="dns destinations")  # fmt: skip
    if settings.dns_destinations:
        _dynamic_forward_proxy(hcm, next(c for c in clusters if c["name"] == "llm-pool"))
    if settings.override_host_endpoints:
        pool = next(c for c in clusters if c["name"] == "llm-pool")
        pool.clear()
        pool.update(_override_host_cluster(settings.override_host_endpoints))
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        route["retry_policy"] = {
            "retry_on": "connect-failure,refused-stream,reset,retriable-status-codes",
            "retriable_status_codes": [502, 503, 504],
            "num_retries": settings.retries,
        }
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    if settings.failure_mode_allow and settings.fallback_endpoints:
        clusters.append(_fallback_cluster(settings.fallback_endpoints))
        routes.append({"name": "fail-open", "match": {"prefix": "/"}, "route": {"cluster": "llm-pool-fallback", "timeout": "0s"}})
    routes[:0] = _closed_routes(settings.closed_prefixes, ext_proc=True)
    return cfg


def _closed_routes(prefixes: Sequence[str], *, ext_proc: bool) -> list[dict[str, Any]]:
    """Routes answering each prefix with Envoy's own 404; first, so no other route takes them."""
    routes: list[dict[str, Any]] = []
    for prefix in prefixes:
        route: dict[str, Any] = {
            "name": f"closed{prefix.rstrip('/').replace('/', '-')}",
            "match": {"prefix": prefix},
            "direct_response": {"status": 404, "body": {"inline_string": f"not found: {prefix} is not served through the gateway\n"}},
        }
        if ext_proc:  # the EPP is not asked: nothing to route, nothing to count
            route["typed_per_filter_config"] = {
                "envoy.filters.http.ext_proc": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "disabled": True,
                }
            }
        routes.append(route)
    return routes


def _epp_tls(epp: dict[str, Any], settings: GatewaySettings) -> None:
    tls: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        # gRPC over TLS negotiates HTTP/2 with ALPN
        "common_tls_context": {"alpn_protocols": ["h2"]},
    }
    if settings.epp_tls_sni:
        tls["sni"] = settings.epp_tls_sni
    if settings.epp_tls_ca:
        tls["common_tls_context"]["validation_context"] = {"trusted_ca": {"filename": settings.epp_tls_ca}}
    epp["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    if "health_checks" in epp:
        # The health port stays plaintext (Kubernetes gRPC probes cannot speak TLS): health checks
        # pick the plain transport socket through a match that no endpoint carries.
        epp["transport_socket_matches"] = [
            {
                "name": "plaintext-health",
                "match": {"llm-epp.health": "plaintext"},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
                },
            }
        ]
        for hc in epp["health_checks"]:
            hc["transport_socket_match_criteria"] = {"llm-epp.health": "plaintext"}


DNS_CACHE = {"name": "llm-destinations", "dns_lookup_family": "V4_PREFERRED"}


def _dynamic_forward_proxy(hcm: dict[str, Any], pool: dict[str, Any]) -> None:
    """Send each request to the `host:port` the EPP named, resolved by Envoy's DNS cache: the Host
    header is rewritten to it (host_rewrite_header), and the dynamic forward proxy filter resolves it
    before the router connects. One destination per request: a fallback list does not resolve."""
    filters = hcm["http_filters"]
    router = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.router")
    filters.insert(router, {
        "name": "envoy.filters.http.dynamic_forward_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
            "dns_cache_config": dict(DNS_CACHE),
        },
    })  # fmt: skip
    route = next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r.get("name") == "picked-by-epp")
    route["typed_per_filter_config"] = {
        "envoy.filters.http.dynamic_forward_proxy": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig",
            "host_rewrite_header": "x-gateway-destination-endpoint",
        }
    }
    keep = {k: pool[k] for k in ("name", "connect_timeout", "per_connection_buffer_limit_bytes", "circuit_breakers") if k in pool}
    pool.clear()
    pool.update(keep)
    pool["lb_policy"] = "CLUSTER_PROVIDED"
    pool["cluster_type"] = {
        "name": "envoy.clusters.dynamic_forward_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
            "dns_cache_config": dict(DNS_CACHE),
        },
    }


def _override_host_cluster(endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    cluster = _fallback_cluster(endpoints)
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = "llm-pool"
    del cluster["lb_policy"]
    cluster["load_balancing_policy"] = {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                        "override_host_sources": [{"header": "x-gateway-destination-endpoint"}],
                        "fallback_policy": {
                            "policies": [
                                {
                                    "typed_extension_config": {
                                        "name": "envoy.load_balancing_policies.least_request",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
                                        },
                                    }
                                }
                            ]
                        },
                    },
                }
            }
        ]
    }
    return cluster


def _pool_circuit_breakers() -> dict[str, Any]:
    """The limits of the reference file's llm-pool cluster, not Envoy's defaults of 1024 (see there)."""
    limits = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
    return {"thresholds": [{"priority": "DEFAULT", **limits}]}


def _fallback_cluster(endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "name": "llm-pool-fallback",
        "type": "STATIC",
        "lb_policy": "LEAST_REQUEST",
        "connect_timeout": "5s",
        "circuit_breakers": _pool_circuit_breakers(),
        "load_assignment": {
            "cluster_name": "llm-pool-fallback",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints
                    ]
                }
            ],
        },
    }


def write(settings: GatewaySettings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(render(settings), sort_keys=False))
    return path


def render_direct(
    listen_port: int, admin_port: int, endpoints: Sequence[tuple[str, int]], access_log_path: str | None = None,
    closed_prefixes: Sequence[str] = (),
) -> dict[str, Any]:
    """The same gateway without ext_proc: Envoy round-robins over the pool. The benchmarks' baseline."""
    cfg = render(GatewaySettings(listen_port=listen_port, epp_port=1, admin_port=admin_port, access_log_path=access_log_path))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        *_closed_routes(closed_prefixes, ext_proc=False),
        {"name": "round-robin", "match": {"prefix": "/"}, "route": {"cluster": "llm-pool-rr", "timeout": "0s"}},
    ]
    rr = _fallback_cluster(endpoints)
    rr["name"] = rr["load_assignment"]["cluster_name"] = "llm-pool-rr"
    rr["lb_policy"] = "ROUND_ROBIN"
    cfg["static_resources"]["clusters"] = [rr]
    return cfg
