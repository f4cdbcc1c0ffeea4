"""The one way the EPP reads YAML: every file (config, endpoints, objectives, model rewrites) comes
through here, so a broken or hostile file costs a ConfigError that names it, never a hang.

PyYAML's safe loader already refuses to build arbitrary objects. What it does not refuse is a small
file that expands into a huge one: a "billion laughs" of nested aliases is 400 bytes that repeat
nodes 10^9 times, and whatever walks the result (validation, an error message's repr) never
finishes. So nodes are counted as they are composed, aliases counted as what they repeat, and the
file is refused past the limits below (docs/configuration.md#file-limits). libyaml parses when
PyYAML has it (several times faster than pure Python); the composer stays ours so the counting works
either way. Nothing here touches the event loop: callers on a running EPP parse in a worker thread.
"""

from __future__ import annotations

import gc
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from yaml import AliasEvent, MarkedYAMLError, YAMLError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.resolver import Resolver

from pickers.framework.errors import ConfigError

try:
    from yaml.cyaml import CParser as _Parser

    LIBYAML = True
except ImportError:  # pragma: no cover - PyYAML's wheels ship libyaml; a source build may not
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _PyParser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            _PyParser.__init__(self)

    LIBYAML = False

MAX_FILE_BYTES = 4 * 1024 * 1024  # a Kubernetes ConfigMap holds at most 1 MiB
MAX_NODES = 1_000_000  # scalars, lists and mappings, aliases expanded: ~60,000 endpoints
MAX_ALIAS_NODES = 10_000  # nodes that aliases repeat, beyond those written out
MAX_DEPTH = 100  # lists and mappings inside each other


def read_text(path: str | os.PathLike[str], *, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of a regular UTF-8 file of at most `max_bytes`. Raises ConfigError naming `what`."""
    source = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not block the open (nor a worker thread forever)
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"cannot read the {what}: {e.strerror or e}", source=source) from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"cannot read the {what}: {e.strerror or e}", source=source) from None
    if not stat.S_ISREG(st.st_mode):  # checked before open(): Python refuses to wrap a directory's fd
        os.close(fd)
        raise ConfigError(f"cannot read the {what}: not a regular file", source=source)
    with open(fd, "rb", closefd=True) as f:
        try:
            if st.st_size > max_bytes:
                raise ConfigError(_too_big(f"{st.st_size:,} bytes", max_bytes), source=source)
            data = f.read(max_bytes + 1)  # the file may grow between fstat and read
        except OSError as e:
            raise ConfigError(f"cannot read the {what}: {e.strerror or e}", source=source) from None
    if len(data) > max_bytes:
        raise ConfigError(_too_big(f"more than {max_bytes:,} bytes", max_bytes), source=source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read the {what}: not UTF-8 text (byte {e.start})", source=source) from None


def load(path: str | os.PathLike[str], *, what: str) -> Any:
    """Read and parse a one-document YAML file. Raises ConfigError."""
    return parse(read_text(path, what=what), source=os.fspath(path))


def load_all(path: str | os.PathLike[str], *, what: str) -> list[Any]:
    """Read and parse a YAML file of one or more documents (empty ones dropped). Raises ConfigError."""
    return parse_all(read_text(path, what=what), source=os.fspath(path))


def parse(
    text: str, *, source: str | None, max_bytes: int = MAX_FILE_BYTES, max_nodes: int = MAX_NODES,
    max_alias_nodes: int = MAX_ALIAS_NODES,
) -> Any:
    """One YAML document (None for an empty text), within the limits. Raises ConfigError."""
    loader = _start(text, source, max_bytes, max_nodes, max_alias_nodes)
    try:
        with _collector_paused():
            return _decoded(loader, lambda: loader.get_single_data())
    finally:
        loader.dispose()


def parse_all(
    text: str, *, source: str | None, max_bytes: int = MAX_FILE_BYTES, max_nodes: int = MAX_NODES,
    max_alias_nodes: int = MAX_ALIAS_NODES,
) -> list[Any]:
    """Every document of a YAML stream, empty ones dropped; the limits hold for the whole stream."""
    loader = _start(text, source, max_bytes, max_nodes, max_alias_nodes)

    def documents() -> list[Any]:
        docs = []
        while loader.check_node():
            doc = loader.construct_document(loader.get_node())
            if doc is not None:
                docs.append(doc)
        return docs

    try:
        with _collector_paused():
            return _decoded(loader, documents)
    finally:
        loader.dispose()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A parse allocates ~10 objects per node and frees them all by reference counting; the cyclic
    collector's passes over them meanwhile hold the GIL for 100s of ms (in a worker thread, that
    stalls the event loop) and double the parse time. Overlapping parses leave it as found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _too_big(size: str, max_bytes: int) -> str:
    mib = f" ({max_bytes / 2**20:g} MiB)" if max_bytes >= 2**20 else ""
    return f"refused: {size}; the limit is {max_bytes:,} bytes{mib}"


def _start(text: str, source: str | None, max_bytes: int, max_nodes: int, max_alias_nodes: int) -> _Loader:
    if len(text) > max_bytes:  # --config-text, or a caller that read the file itself
        raise ConfigError(_too_big(f"{len(text):,} characters", max_bytes), source=source)
    return _Loader(text, source, max_nodes, max_alias_nodes)


def _decoded(loader: _Loader, build: Callable[[], Any]) -> Any:
    """Run `build()`, turning every way a text can fail to decode into one ConfigError."""
    try:
        return build()
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = e.problem or e.context or "malformed"
        raise ConfigError(f"invalid YAML{where}: {problem}", source=loader.source) from None
    except YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", source=loader.source) from None
    except (ValueError, OverflowError) as e:
        # a scalar the constructor cannot turn into a value: a 5,000-digit integer, 2024-13-45
        raise ConfigError(f"invalid YAML value: {e}", source=loader.source) from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH refuses first
        raise ConfigError(f"refused: nested more than {MAX_DEPTH} levels deep", source=loader.source) from None


class _BoundedComposer(Composer):
    """PyYAML's composer, counting what the document expands to, aliases included, as it goes: a
    file past a limit is refused at the node that crosses it, before anything is built from it."""

    def __init__(self, source: str | None, max_nodes: int, max_alias_nodes: int) -> None:
        Composer.__init__(self)
        self.source = source
        self.max_nodes = max_nodes
        self.max_alias_nodes = max_alias_nodes
        self.nodes = 0  # nodes composed so far, each alias counted as the nodes it repeats
        self.alias_nodes = 0  # of those, the ones aliases repeat
        self._depth = 0
        self._sizes: dict[str, int] = {}  # anchor -> nodes its value expands to, once it is complete

    def compose_document(self) -> Any:
        self._sizes = {}  # anchors do not cross documents
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            size = self._sizes.get(event.anchor)
            if size is None and event.anchor in self.anchors:
                raise self._refuse(f"alias *{event.anchor} is inside its own anchor (a recursive structure)", event.start_mark)
            if size is not None:
                self.alias_nodes += size
                self.nodes += size
                if self.alias_nodes > self.max_alias_nodes:
                    raise self._refuse(
                        f"aliases repeat more than {self.max_alias_nodes:,} nodes (a YAML alias bomb?); "
                        "write the repeated values out",
                        event.start_mark,
                    )
                if self.nodes > self.max_nodes:
                    raise self._too_many(event.start_mark)
            return Composer.compose_node(self, parent, index)  # an undefined alias is PyYAML's error
        before = self.nodes
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise self._too_many(event.start_mark)
        self._depth += 1  # not restored on an error: the loader is dropped then
        if self._depth > MAX_DEPTH:
            raise self._refuse(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        node = Composer.compose_node(self, parent, index)
        self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = self.nodes - before
        return node

    def _too_many(self, mark: Mark) -> ConfigError:
        return self._refuse(f"more than {self.max_nodes:,} YAML nodes; split the file or write less", mark)

    def _refuse(self, why: str, mark: Mark | None) -> ConfigError:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return ConfigError(f"refused: {why}{where}", source=self.source)


class _Loader(_BoundedComposer, _Parser, SafeConstructor, Resolver):  # type: ignore[misc]
    """libyaml's (or PyYAML's) parser for events; our composer; PyYAML's safe constructor."""

    def __init__(self, text: str, source: str | None, max_nodes: int, max_alias_nodes: int) -> None:
        _Parser.__init__(self, text)
        _BoundedComposer.__init__(self, source, max_nodes, max_alias_nodes)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
