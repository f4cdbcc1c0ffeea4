"""InferenceObjectives: the one home of objective name -> priority (GIE's InferenceObjective CRD).

A request names its objective in `x-gateway-inference-objective` (llm-d: `x-llm-d-inference-objective`);
an unknown or missing objective has priority 0, and a negative priority makes the request sheddable.
Two sources feed the store: a static file (`--objectives`, for use without Kubernetes) and the
InferenceObjectives of our pool watched from the API server; a watched objective wins over a file entry
of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pickers.config import safe_yaml
from pickers.framework.errors import ConfigError, shown

OBJECTIVE_HEADERS = ("x-gateway-inference-objective", "x-llm-d-inference-objective")


def objective_of(headers: Mapping[str, str]) -> str:
    """The objective a request names, or "" when it names none."""
    for key in OBJECTIVE_HEADERS:
        value = headers.get(key)
        if value:
            return value.strip()
    return ""


class ObjectiveStore:
    """Objective name -> priority; `priority()` is one dict lookup on the request path."""

    def __init__(self, static: Mapping[str, int] | None = None) -> None:
        self._static: dict[str, int] = dict(static or {})
        self._watched: dict[str, int] = {}
        self._merged: dict[str, int] = dict(self._static)

    def priority(self, name: str) -> int:
        return self._merged.get(name, 0) if name else 0

    def names(self) -> dict[str, int]:
        return dict(self._merged)

    # -- the watch (extproc.kubernetes.objective_watches) --------------------------------------------------------
    def replace_watched(self, priorities: Mapping[str, int]) -> None:
        self._watched = dict(priorities)
        self._merge()

    def put_watched(self, name: str, priority: int) -> None:
        self._watched[name] = priority
        self._merge()

    def delete_watched(self, name: str) -> None:
        if self._watched.pop(name, None) is not None:
            self._merge()

    def _merge(self) -> None:
        self._merged = {**self._static, **self._watched}  # swapped whole: a reader never sees half


def load_objectives_file(path: str | Path) -> dict[str, int]:
    """`--objectives FILE`: a YAML list of `{name, priority}` (priority defaults to 0)."""
    source = str(path)
    doc = safe_yaml.load(path, what="objectives file")
    if doc is None:
        return {}
    if not isinstance(doc, list):
        raise ConfigError("expected a list of {name, priority}", source=source)
    out: dict[str, int] = {}
    for i, item in enumerate(doc):
        if not isinstance(item, dict) or set(item) - {"name", "priority"}:
            raise ConfigError("expected a mapping with `name` and optional `priority`", source=source, field=f"[{i}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"expected a non-empty string, got {shown(name)}", source=source, field=f"[{i}].name")
        priority = item.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError(f"expected an integer, got {shown(priority)}", source=source, field=f"[{i}].priority")
        if name in out:
            raise ConfigError(f"objective {shown(name)} is listed twice", source=source, field=f"[{i}].name")
        out[name] = priority
    return out
