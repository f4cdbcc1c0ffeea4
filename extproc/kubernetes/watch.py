"""List + watch of one kind of object, the way client-go's reflector does it.

List (a consistent read) and hand every item to `handler.replace`; then watch from the list's
resourceVersion with bookmarks, handing each change to `handler.apply` and remembering the newest
resourceVersion. A watch that ends (server timeout) resumes from there; 410 Gone (the version was
compacted away) re-lists. Any other failure - API down, connection dropped, a 5xx - is logged, the
handler keeps what it has, and the loop retries with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import msgspec

from extproc.datalayer.supervisor import Backoff
from extproc.kubernetes.client import KubeApiError, raise_for_status, read_body
from extproc.kubernetes.objects import decode_event, decode_list, decode_status, resource_version_of

log = logging.getLogger(__name__)

ListCall = Callable[..., Awaitable[Any]]  # a kubernetes_asyncio list_* method, path arguments bound


class WatchHandler(Protocol):
    def replace(self, items: list[msgspec.Raw]) -> None:
        """The full set of objects, from a (re-)list."""

    def apply(self, event_type: str, obj: msgspec.Raw) -> None:
        """One change: ADDED, MODIFIED or DELETED."""


class _Relist(Exception):
    """The resourceVersion we hold is too old (410 Gone): start over with a list."""


class ListWatch:
    """Keeps `handler` equal to the objects `list_call` selects; `run()` never returns."""

    def __init__(
        self,
        list_call: ListCall,
        handler: WatchHandler,
        *,
        what: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout: tuple[int, int] = (300, 600),  # server-side timeoutSeconds, drawn per watch
        request_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.list_call = list_call
        self.handler = handler
        self.what = what
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff = backoff or Backoff(0.2, 10.0)
        self.resource_version: str | None = None
        self.lists = 0  # completed lists (1 + re-lists)
        self._failing: str | None = None

    def _selectors(self) -> dict[str, str]:
        sel: dict[str, str] = {}
        if self.label_selector:
            sel["label_selector"] = self.label_selector
        if self.field_selector:
            sel["field_selector"] = self.field_selector
        return sel

    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except _Relist:
                log.info("%s: resourceVersion %s expired (410 Gone); re-listing", self.what, self.resource_version)
                self.resource_version = None
            except (KubeApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                if isinstance(e, KubeApiError) and e.status == 410:
                    self.resource_version = None
                delay = self.backoff.next_delay()
                message = f"{type(e).__name__}: {e}" if not isinstance(e, KubeApiError) else str(e)
                if self._failing is None:
                    log.warning(
                        "%s: Kubernetes API unreachable or failing (%s); keeping the last known state, "
                        "retrying in %.1fs", self.what, message, delay,
                    )  # fmt: skip
                else:
                    log.debug("%s: still failing (%s); retrying in %.1fs", self.what, message, delay)
                self._failing = message
                await asyncio.sleep(delay)

    def _recovered(self) -> None:
        self.backoff.reset()
        if self._failing is not None:
            log.info("%s: Kubernetes API reachable again", self.what)
            self._failing = None

    async def _list(self) -> None:
        resp = await self.list_call(
            **self._selectors(), _preload_content=False, _request_timeout=self.request_timeout
        )
        data = await read_body(resp, what=f"list {self.what}")
        lst = decode_list(data)
        self.handler.replace(list(lst.items))
        self.resource_version = lst.metadata.resource_version
        self.lists += 1
        self._recovered()

    async def _watch(self) -> None:
        timeout = random.randint(*self.watch_timeout)
        resp = await self.list_call(
            **self._selectors(),
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version,
            timeout_seconds=timeout,
            _preload_content=False,
            # A silent connection is dead: the server closes it at `timeout`, and bookmarks come in between.
            _request_timeout=aiohttp.ClientTimeout(sock_connect=self.request_timeout, sock_read=timeout + 30),
        )
        try:
            if resp.status == 410:
                resp.release()
                raise _Relist()
            await raise_for_status(resp, what=f"watch {self.what}")
            self._recovered()
            while True:
                line = await resp.content.readline()
                if not line:
                    return  # the server ended the watch: resume from resource_version
                if line.strip():
                    self._on_line(line)
        finally:
            resp.close()

    def _on_line(self, line: bytes) -> None:
        event = decode_event(line)
        kind = event.type
        if kind == "ERROR":
            status = decode_status(event.object)
            if status.code == 410:
                raise _Relist()
            raise KubeApiError(status.code, status.reason, status.message, what=f"watch {self.what}")
        rv = resource_version_of(event.object)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.handler.apply(kind, event.object)
        elif kind != "BOOKMARK":
            log.debug("%s: ignoring watch event of type %s", self.what, kind)
        if rv:
            self.resource_version = rv
