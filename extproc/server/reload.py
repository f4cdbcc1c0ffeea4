"""Config hot reload: `epp serve --config-file F` applies a changed F without dropping a request.

`ConfigReloader.poll_once` stats F (extproc.datalayer.file_watch: a ConfigMap's `..data` symlink swap
shows as a new inode), and when it moved reads F and loads it on a worker thread (safe_yaml bounds
the parse), handing the loader the config serving so that unchanged plugins keep their state
(pickers.config.loader). The result is applied in two phases on the event loop, so between two
requests: every hook's `check` first (a part that cannot change at runtime says why), then, only if
none refused, every hook's `apply`. No hook awaits, so a request sees the old config or the new one,
never a mixture; requests already routed finish with the objects they were routed with.

A bad edit (invalid YAML, an unknown plugin, a file emptied or deleted mid-swap) or a refused one
keeps the last good config: it is logged once per distinct error, counted in
`llm_epp_config_reloads_total{result="error"}` and shown on /debug/config and by `epp status`.

The composition root (extproc.server.runner) registers one hook per part that takes config; a part
added later (flow control) registers its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.datalayer.file_watch import FileIdentity, file_identity, may_have_changed
from extproc.observability.metrics import EppMetrics
from pickers.config import safe_yaml
from pickers.config.loader import EndpointPickerConfig
from pickers.framework.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # seconds between stats of the file; a ConfigMap update takes ~1 min to reach the pod anyway

# (text, source, the config serving) -> the new config; raises ConfigError
Loader = Callable[[str, str, EndpointPickerConfig], EndpointPickerConfig]


@dataclass(slots=True, frozen=True)
class ReloadHook:
    """One part of the EPP that takes config. `check(old, new)` returns why `new` cannot be applied
    at runtime (None: it can) and may raise ConfigError; `apply(new)` must not fail once every check
    passed (do the work that can fail in `check`)."""

    name: str
    apply: Callable[[EndpointPickerConfig], None]
    check: Callable[[EndpointPickerConfig, EndpointPickerConfig], str | None] | None = None


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ConfigReloader:
    """Watches one config file and swaps the config serving when it changes to a valid one."""

    def __init__(
        self, path: str, current: EndpointPickerConfig, text: str, load: Loader, metrics: EppMetrics, *,
        interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        """`current` was loaded from `text` (the file's content at start-up); `load` builds a config
        from a new text (pickers.config.loader.load_config with the server's PluginContext)."""
        self.path = path
        self.current = current
        self.interval = interval
        self.hooks: list[ReloadHook] = []
        self._load = load
        self._metrics = metrics
        self._clock = clock
        self._identity: FileIdentity | None = file_identity(path)  # racing a write: the next poll sees it
        self._hash = text_hash(text)  # the text serving
        self._failed_hash: str | None = None  # the last text that failed, not loaded again until it changes
        self.loaded_at = clock()
        self.last_error: str | None = None  # the current file's problem, if any; None once a good one loads
        self.last_error_at: float | None = None
        metrics.config_loaded = (path, self._hash, self.loaded_at)

    def register(
        self, name: str, apply: Callable[[EndpointPickerConfig], None],
        check: Callable[[EndpointPickerConfig, EndpointPickerConfig], str | None] | None = None,
    ) -> None:  # fmt: skip
        self.hooks.append(ReloadHook(name, apply, check))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_once()

    async def poll_once(self) -> bool:
        """Look at the file; reload it if it changed. True when a new config was applied."""
        identity = file_identity(self.path)
        if not may_have_changed(identity, self._identity):
            return False
        self._identity = identity
        if identity is None:
            self._fail(f"config file {self.path}: not found (deleted, or a ConfigMap swap under way)")
            return False
        try:
            text = await asyncio.to_thread(safe_yaml.read_text, self.path, what="config file")
        except ConfigError as e:
            self._fail(str(e))
            return False
        digest = text_hash(text)
        if digest == self._hash:  # touched, or swapped back: nothing to do
            self._recovered()
            return False
        if digest == self._failed_hash:
            return False  # said already
        try:
            new = await asyncio.to_thread(self._load, text, self.path, self.current)
            refused = self._refusals(new)
        except ConfigError as e:
            self._fail(str(e), digest)
            return False
        except Exception as e:  # a bug in a plugin's factory must cost the reload, not the watch
            log.exception("config file %s: loading it failed", self.path)
            self._fail(f"config file {self.path}: internal error while loading: {e}", digest)
            return False
        if refused:
            self._fail(f"config file {self.path}: not applied, restart the EPP to change {'; '.join(refused)}", digest)
            return False
        # Phase two, on the loop with no await: requests see the old config or the new, never a mixture.
        for hook in self.hooks:
            hook.apply(new)
        self.current = new  # the old config lives on in what routed requests hold, until they finish
        self._hash, self._failed_hash = digest, None
        self.loaded_at = self._clock()
        self._metrics.config_reload(True)
        self._metrics.config_loaded = (self.path, digest, self.loaded_at)
        if self.last_error is not None:
            log.info("config file %s is valid again", self.path)
        self.last_error = self.last_error_at = None
        kept = ", ".join(new.kept) or "none"
        log.info(
            "config file %s reloaded (sha256 %s): profiles %s; plugins kept with their state: %s",
            self.path, digest[:12], ", ".join(p.name for p in new.profiles), kept,
        )  # fmt: skip
        return True

    def _refusals(self, new: EndpointPickerConfig) -> list[str]:
        """Phase one: what each part says it cannot change at runtime. Raises ConfigError."""
        out = []
        for hook in self.hooks:
            if hook.check is not None:
                why = hook.check(self.current, new)
                if why:
                    out.append(why)
        return out

    def _fail(self, message: str, digest: str | None = None) -> None:
        self._failed_hash = digest
        self._metrics.config_reload(False)
        if message != self.last_error:
            log.error("%s; keeping the last good config (loaded %s)", message, _when(self.loaded_at))
        self.last_error, self.last_error_at = message, self._clock()

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info("config file %s is back to the config serving", self.path)
        self.last_error = self.last_error_at = None
        self._failed_hash = None

    def status(self) -> dict[str, Any]:
        """For /debug/config and `epp status`."""
        return {
            "source": self.path, "sha256": self._hash, "loaded_at": self.loaded_at, "watch_interval_s": self.interval,
            "reloads": dict(self._metrics.config_reloads), "last_error": self.last_error, "last_error_at": self.last_error_at,
            "kept_plugins": list(self.current.kept),
        }  # fmt: skip


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
