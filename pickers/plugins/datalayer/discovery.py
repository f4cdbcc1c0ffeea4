"""`file-discovery`: the pool listed in an endpoints file (llm-d's format, or llm-epp's `--endpoints`
format), chosen with `dataLayer.discovery.pluginRef`. extproc.datalayer.endpoints_file reads the file."""

from __future__ import annotations

from dataclasses import dataclass

from pickers.framework.params import Params
from pickers.plugins.base import Plugin, PluginContext


@dataclass(slots=True, frozen=True)
class FileDiscoveryConfig:
    path: str  # as written: a relative path is relative to the EPP's working directory, as in llm-d
    watch_file: bool = False  # llm-d's default: read once at start-up


class FileDiscovery(Plugin):
    type = "file-discovery"

    def __init__(self, name: str | None, config: FileDiscoveryConfig) -> None:
        super().__init__(name)
        self.config = config

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> FileDiscovery:
        path = p.string("path", required=True)
        assert path is not None
        return cls(name, FileDiscoveryConfig(path, p.flag("watchFile", False)))
