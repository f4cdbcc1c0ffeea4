"""`file-discovery`: the pool listed in an endpoints file (llm-d's format, or llm-epp's `--endpoints`
format), chosen with `dataLayer.discovery.pluginRef`; `multicluster-file-discovery`: the same file
whose entries are peer clusters (a cluster-scoped EPP). extproc.datalayer.endpoints_file reads both."""

from __future__ import annotations

from dataclasses import dataclass

from pickers.framework.params import Params
from pickers.plugins.base import Plugin, PluginContext


@dataclass(slots=True, frozen=True)
class FileDiscoveryConfig:
    path: str  # as written: a relative path is relative to the EPP's working directory, as in llm-d
    watch_file: bool = False  # llm-d's default: read once at start-up
    # entries are peer clusters: gateway hosts (an IP or a DNS name), metrics at their metricsAddress label
    peer_clusters: bool = False


class FileDiscovery(Plugin):
    type = "file-discovery"
    peer_clusters = False

    def __init__(self, name: str | None, config: FileDiscoveryConfig) -> None:
        super().__init__(name)
        self.config = config

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> FileDiscovery:
        path = p.string("path", required=True)
        assert path is not None
        return cls(name, FileDiscoveryConfig(path, p.flag("watchFile", False), cls.peer_clusters))


class MulticlusterFileDiscovery(FileDiscovery):
    """llm-d's cluster-scoped file discovery: the same file and parameters, each entry a peer cluster
    reached at its gateway (`address` an IP or an RFC 1123 DNS name), its pool metrics scraped at its
    `metricsAddress` label (`metricsPort` label, default the entry's port) when it has one."""

    type = "multicluster-file-discovery"
    peer_clusters = True
