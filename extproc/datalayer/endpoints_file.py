"""Static discovery: the pool is listed in a YAML (or JSON) endpoints file, re-read whenever it changes.

One format for `epp serve --endpoints` and llm-d's `file-discovery` (`dataLayer.discovery`): llm-d's
entries (`name`, `namespace`, `address`, `port` as a string, `labels`) are a subset of ours. Ours add
`metricsPort`, `metricsPath`, for data-parallel ranks `rank` (the index among its pod's serving
ports, as an InferencePool's targetPorts index) and `dpGroup` (the ranks that step together), and for
GPU exporters `pod` (the name a DCGM exporter's `pod` label gives it; default `name`) and
`nodeAddress` (its node's IP, for a `dcgm-data-source` with `useNodeAddress`).

`peer_clusters=True` reads the same format as llm-d's `multicluster-file-discovery` does: each entry is
a peer cluster reached at its gateway, whose address must be an IP or a DNS name (RFC 1123), and whose
labels `metricsAddress` (and `metricsPort`, default the entry's port) say where its pool metrics are.

Changes are detected by polling the file (extproc.datalayer.file_watch: inode, size, mtime through symlinks), which also
catches the atomic `..data` symlink swap Kubernetes does when a mounted ConfigMap is updated. A
changed file is read and parsed in a worker thread (pickers.config.safe_yaml bounds the work), so
requests keep flowing while a large or hostile file is looked at.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.file_watch import FileIdentity, file_identity, may_have_changed
from pickers.config import safe_yaml
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.errors import ConfigError, shown

log = logging.getLogger(__name__)

# Ranks of one pod: far above any data-parallel size per node, low enough that base port + rank (KV
# events, a sidecar's rank ports) stays a port.
_MAX_RANK = 1023

_FIELDS = (
    "address", "host", "port", "name", "namespace", "labels", "metricsPort", "metricsPath", "rank", "dpGroup", "pod",
    "nodeAddress",
)  # fmt: skip
# a peer cluster's entry: where its pool metrics are, as llm-d's multicluster-file-discovery reads them
METRICS_ADDRESS_LABEL = "metricsAddress"
METRICS_PORT_LABEL = "metricsPort"
# a pod's own fields: nothing a cluster has
_CLUSTER_REFUSED = {
    "rank": "a data-parallel rank of a pod",
    "dpGroup": "a data-parallel group of a pod's ranks",
    "pod": "the pod a GPU exporter's samples name",
    "nodeAddress": "the node of a pod, for a GPU exporter",
}
# Kubernetes' DNS-1123 subdomain (what llm-d's multicluster discovery takes besides an IP)
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_MAX = 253


def load_endpoints_file(path: str | os.PathLike[str], *, peer_clusters: bool = False) -> list[EndpointSpec]:
    """Read and validate an endpoints file. Raises ConfigError naming the file and the field."""
    source = os.fspath(path)
    return parse_endpoints_yaml(_read(source), source=source, peer_clusters=peer_clusters)


def _read(path: str) -> str:
    return safe_yaml.read_text(path, what="endpoints file")


def parse_endpoints_yaml(text: str, *, source: str | None = None, peer_clusters: bool = False) -> list[EndpointSpec]:
    """Validate the text of an endpoints file."""
    return parse_endpoints(safe_yaml.parse(text, source=source), source=source, peer_clusters=peer_clusters)


def parse_endpoints(doc: Any, *, source: str | None = None, peer_clusters: bool = False) -> list[EndpointSpec]:
    """Validate an already-decoded endpoints document: `{endpoints: [...]}` or a bare list."""
    if isinstance(doc, Mapping):
        extra = [str(k) for k in doc if k != "endpoints"]
        if extra:
            names = ", ".join(shown(k, 40) if len(k) > 40 else k for k in sorted(extra)[:5])
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ConfigError(f"unknown top-level field(s) {names}{more}; expected 'endpoints'", source=source)
        items = doc.get("endpoints")
        prefix = "endpoints"
        if items is None:
            items = []
        if not isinstance(items, list):
            raise ConfigError(f"expected a list, got {shown(items)}", source=source, field=prefix)
    elif isinstance(doc, list):
        items, prefix = doc, ""
    else:
        raise ConfigError(
            f"expected a mapping with an 'endpoints' list, or a list, got {shown(doc)}",
            source=source,
        )

    specs: list[EndpointSpec] = []
    seen_addresses: dict[str, int] = {}
    seen_names: dict[tuple[str, str], int] = {}
    seen_ranks: dict[tuple[str, str, int], int] = {}  # (dpGroup, host, rank): one engine per rank of a pod
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]"
        spec = _parse_endpoint(item, source=source, where=where)
        if peer_clusters:
            spec = _peer_cluster(spec, item, source=source, where=where)
        if spec.address in seen_addresses:
            raise ConfigError(
                f"duplicate address {spec.address} (also {prefix}[{seen_addresses[spec.address]}])",
                source=source,
                field=where,
            )
        key = (spec.namespace or "default", spec.name)  # llm-d's identity: namespace/name
        if key in seen_names:
            raise ConfigError(
                f"duplicate name {shown(spec.name)} (also {prefix}[{seen_names[key]}])",
                source=source,
                field=f"{where}.name",
            )
        if spec.dp_group:
            rank_key = (spec.dp_group, spec.host, spec.rank)
            if rank_key in seen_ranks:
                raise ConfigError(
                    f"rank {spec.rank} of dpGroup {shown(spec.dp_group)} on host {spec.host} is also "
                    f"{prefix}[{seen_ranks[rank_key]}]; each rank of a group's pod is one endpoint",
                    source=source,
                    field=f"{where}.rank",
                )
            seen_ranks[rank_key] = i
        seen_addresses[spec.address] = i
        seen_names[key] = i
        specs.append(spec)
    return specs


def _parse_endpoint(item: Any, *, source: str | None, where: str) -> EndpointSpec:
    def fail(field: str | None, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=f"{where}.{field}" if field else where)

    if not isinstance(item, Mapping):
        raise fail(None, f"expected a mapping with 'address' and 'port', got {shown(item)}")
    unknown = [str(k) for k in item if k not in _FIELDS]  # str(): YAML keys may be numbers
    if unknown:
        raise fail(unknown[0], f"unknown field; expected one of {', '.join(_FIELDS)}")

    if "address" in item and "host" in item:
        raise fail("host", "give either 'address' or 'host', not both")
    key = "host" if "host" in item else "address"
    raw = item.get(key)
    if raw is None:
        raise fail("address", "missing; expected a host or IP address")
    if not isinstance(raw, str) or not raw.strip():
        raise fail(key, f"expected a host or IP address, got {shown(raw)}")
    raw = raw.strip()
    host, embedded_port = (
        (None, None) if any(c.isspace() or c in "/?#@" for c in raw) else _split_host_port(raw)
    )
    if host is None:
        raise fail(key, f"expected a host, IP address or host:port, got {shown(raw)}")

    port = item.get("port")
    if port is None:
        if embedded_port is None:
            raise fail("port", f"missing; give 'port' or write the {key} as host:port")
        port_value = _port(embedded_port)
        if port_value is None:
            raise fail(key, f"port must be an integer 1-65535, got {shown(raw)}")
    else:
        port_value = _port(port)
        if port_value is None:
            raise fail("port", f"expected an integer 1-65535, got {shown(port)}")
        if embedded_port is not None and _port(embedded_port) != port_value:
            raise fail("port", f"{port_value} disagrees with the port in {key} {shown(raw)}")

    metrics_port: int | None = None
    if item.get("metricsPort") is not None:
        metrics_port = _port(item["metricsPort"])
        if metrics_port is None:
            raise fail("metricsPort", f"expected an integer 1-65535, got {shown(item['metricsPort'])}")

    metrics_path = item.get("metricsPath")
    if metrics_path is not None and (not isinstance(metrics_path, str) or not metrics_path.startswith("/")):
        raise fail("metricsPath", f"expected a path starting with '/', got {shown(metrics_path)}")

    namespace = item.get("namespace", "")
    if not isinstance(namespace, str):
        raise fail("namespace", f"expected a string, got {shown(namespace)}")

    labels_raw = item.get("labels")
    labels: dict[str, str] = {}
    if labels_raw is not None:
        if not isinstance(labels_raw, Mapping):
            raise fail("labels", f"expected a mapping of strings, got {shown(labels_raw)}")
        for k, v in labels_raw.items():
            if not isinstance(k, str) or not k:
                raise fail("labels", f"label names must be non-empty strings, got {shown(k)}")
            if not isinstance(v, str):
                raise fail(f"labels.{k}", f"expected a string (quote it), got {shown(v)}")
            labels[k] = v

    rank = item.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= _MAX_RANK:
        raise fail("rank", f"expected an integer 0-{_MAX_RANK} (the endpoint's index among its pod's ranks), got {shown(rank)}")
    dp_group = item.get("dpGroup", "")
    if dp_group is None:
        dp_group = ""
    if not isinstance(dp_group, str):
        raise fail("dpGroup", f"expected a string naming the endpoint's data-parallel group, got {shown(dp_group)}")
    dp_group = dp_group.strip()

    pod = item.get("pod", "")
    if pod is None:
        pod = ""
    if not isinstance(pod, str):
        raise fail("pod", f"expected the pod's name (a string), got {shown(pod)}")
    node_address = ""
    raw_node = item.get("nodeAddress")
    if raw_node is not None:
        node_host, node_port = (
            (None, None) if not isinstance(raw_node, str) or any(c.isspace() or c in "/?#@" for c in raw_node)
            else _split_host_port(raw_node.strip())
        )  # fmt: skip
        if node_host is None or node_port is not None:
            raise fail("nodeAddress", f"expected the node's host name or IP address (no port), got {shown(raw_node)}")
        node_address = node_host

    address = f"{host}:{port_value}"
    name = item.get("name")
    if name is None:
        name = address
    elif not isinstance(name, str) or not name:
        raise fail("name", f"expected a non-empty string, got {shown(name)}")

    return EndpointSpec(
        name=name,
        host=host,
        port=port_value,
        labels=labels,
        metrics_port=metrics_port,
        metrics_path=metrics_path,
        namespace=namespace,
        rank=rank,
        dp_group=dp_group,
        pod=pod.strip(),
        node_address=node_address,
    )


def _peer_cluster(spec: EndpointSpec, item: Mapping[str, Any], *, source: str | None, where: str) -> EndpointSpec:
    """A peer cluster's entry: its gateway host an IP or a DNS name, its metrics where its labels say."""

    def fail(field: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=f"{where}.{field}")

    key = "host" if "host" in item else "address"
    if not is_host_or_ip(spec.host):
        raise fail(key, f"expected a cluster gateway's IP address or DNS name (RFC 1123: lower-case letters, digits, "
                        f"'-' and '.'), got {shown(spec.host)}")  # fmt: skip
    for field, what in _CLUSTER_REFUSED.items():
        if field in item:
            raise fail(field, f"{what}; a peer cluster's entry has none")
    address = spec.labels.get(METRICS_ADDRESS_LABEL)
    port_label = spec.labels.get(METRICS_PORT_LABEL)
    if address is None:
        if port_label is not None:
            raise fail(
                f"labels.{METRICS_PORT_LABEL}",
                f"needs a {METRICS_ADDRESS_LABEL} label (llm-d reads {METRICS_PORT_LABEL} only with it); to scrape "
                "the gateway's own host at another port, give the metricsPort field",
            )
        return spec
    host, embedded = _split_host_port(address.strip()) if address.strip() else (None, None)
    if host is None or embedded is not None or not is_host_or_ip(host):
        raise fail(f"labels.{METRICS_ADDRESS_LABEL}", f"expected an IP address or DNS name without a port, got {shown(address)}")
    metrics_port = spec.metrics_port
    if port_label is not None:
        if metrics_port is not None:
            raise fail(f"labels.{METRICS_PORT_LABEL}", "the metricsPort field gives the metrics port too; give one")
        metrics_port = _port(port_label)
        if metrics_port is None:
            raise fail(f"labels.{METRICS_PORT_LABEL}", f"expected an integer 1-65535, got {shown(port_label)}")
    return replace(spec, metrics_host=host, metrics_port=metrics_port or spec.port)


def is_host_or_ip(host: str) -> bool:
    """An IP address (IPv6 bracketed, as hosts are kept) or a DNS-1123 subdomain."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return len(host) <= _DNS_MAX and _DNS_1123.fullmatch(host) is not None
    return True


def _split_host_port(raw: str) -> tuple[str | None, str | None]:
    """`host`, `host:port`, `v6`, `[v6]`, `[v6]:port` -> (host, port text). IPv6 hosts come back
    bracketed so that `host:port` is a valid address for Envoy and a valid URL authority."""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            return None, None
        inner, rest = raw[1:end], raw[end + 1 :]
        if not _is_ipv6(inner):
            return None, None
        if not rest:
            return f"[{inner}]", None
        if not rest.startswith(":"):
            return None, None
        return f"[{inner}]", rest[1:]
    if raw.count(":") > 1:
        return (f"[{raw}]", None) if _is_ipv6(raw) else (None, None)
    if ":" in raw:
        host, _, port = raw.partition(":")
        return (host or None), port
    return raw, None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(value: Any) -> int | None:
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 5 else None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= 65535 else None


def _read_if_changed(
    path: str, last_text: str | None, peer_clusters: bool = False
) -> tuple[str, list[EndpointSpec] | ConfigError | None]:
    """Read the file and parse it if its text changed: (text, its endpoints or its error), or
    (text, None) when unchanged. Runs in a worker thread: it touches nothing shared. Raises
    ConfigError when the file cannot be read."""
    text = _read(path)
    if text == last_text:
        return text, None
    try:
        return text, parse_endpoints_yaml(text, source=path, peer_clusters=peer_clusters)
    except ConfigError as e:
        return text, e


class StaticFileDiscovery:
    """Keeps the datastore's membership equal to the endpoints file.

    `load()` reads the file once and raises ConfigError (call it at start-up to fail fast); `run()`
    loads if that has not happened, then polls. Reloads read and parse in a worker thread. A bad file
    seen later keeps the last good table and logs its error once per version of the file.
    """

    def __init__(
        self, path: str | os.PathLike[str], datastore: Datastore, *, poll_interval: float = 1.0, watch: bool = True,
        peer_clusters: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.peer_clusters = peer_clusters  # entries are peer clusters (multicluster-file-discovery)
        self.datastore = datastore
        self.poll_interval = poll_interval
        self.watch = watch  # False: read once (llm-d's file-discovery with watchFile: false)
        self._identity: FileIdentity | None = None
        self._text: str | None = None  # last text read, good or bad
        self._loaded = False
        self.last_error: str | None = None  # the error of the current bad file, if any

    def load(self) -> list[EndpointSpec]:
        """Read the file and set the membership. Raises ConfigError; the table is then unchanged."""
        return self._take(*self._read_first())

    def _read_first(self) -> tuple[FileIdentity | None, str, list[EndpointSpec]]:
        identity = file_identity(self.path)  # before reading: a write racing the read shows later
        text = _read(self.path)
        return identity, text, parse_endpoints_yaml(text, source=self.path, peer_clusters=self.peer_clusters)

    def _take(
        self, identity: FileIdentity | None, text: str, specs: list[EndpointSpec]
    ) -> list[EndpointSpec]:
        self._identity, self._text = identity, text
        self._apply(specs)
        return specs

    async def poll_once(self) -> bool:
        """Reload if the file changed. Returns True when a new table was applied."""
        identity = file_identity(self.path)
        if not may_have_changed(identity, self._identity):
            return False
        try:
            text, parsed = await asyncio.to_thread(_read_if_changed, self.path, self._text, self.peer_clusters)
        except ConfigError as e:
            self._identity, self._text = identity, None
            if str(e) != self.last_error:  # a missing file stays missing: say it once
                log.error("%s; keeping the last endpoints", e)
            self.last_error = str(e)
            return False
        self._identity = identity
        if parsed is None:
            return False
        self._text = text
        if isinstance(parsed, ConfigError):
            log.error("%s; keeping the last endpoints", parsed)  # once per version: its text is remembered
            self.last_error = str(parsed)
            return False
        before = {ep.address for ep in self.datastore.candidates()}
        self._apply(parsed)
        after = {s.address for s in parsed}
        log.info(
            "endpoints file %s reloaded: %d endpoints (+%d, -%d)",
            self.path, len(after), len(after - before), len(before - after),
        )
        return True

    def _apply(self, specs: list[EndpointSpec]) -> None:
        self.datastore.set_endpoints(specs)
        self._loaded = True
        if self.last_error is not None:
            log.info("endpoints file %s is valid again", self.path)
        self.last_error = None

    async def run(self) -> None:
        if not self._loaded:
            self._take(*await asyncio.to_thread(self._read_first))
        while self.watch:
            await asyncio.sleep(self.poll_interval)
            await self.poll_once()
