"""Reading a plugin's `parameters` mapping: typed getters that name the field and what was expected.

A plugin reads each parameter it knows, then calls `done()`, which refuses any it did not read, so a
misspelt parameter is an error rather than a silently ignored default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pickers.framework.errors import ConfigError, shown


class ParameterError(ConfigError):
    """A parameter is wrong. `param` is its name; the config loader prefixes the path to the plugin."""

    def __init__(self, param: str, detail: str) -> None:
        self.param = param
        self.detail = detail
        super().__init__(detail, field=param)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Params:
    def __init__(self, parameters: Mapping[str, Any] | None) -> None:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping):
            raise ParameterError("", f"expected a mapping of parameters, got {_kind(parameters)}")
        self._values = dict(parameters)
        self._read: set[str] = set()

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._values.get(key)

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParameterError(key, f"expected an integer, got {_kind(v)} {shown(v)}")
        if minimum is not None and v < minimum:
            raise ParameterError(key, f"expected an integer >= {minimum}, got {v}")
        return v

    def number(self, key: str, default: float, *, minimum: float | None = None, positive: bool = False) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ParameterError(key, f"expected a number, got {_kind(v)} {shown(v)}")
        if positive and v <= 0:
            raise ParameterError(key, f"expected a positive number, got {v}")
        if minimum is not None and v < minimum:
            raise ParameterError(key, f"expected a number >= {minimum}, got {v}")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ParameterError(key, f"expected true or false, got {_kind(v)} {shown(v)}")
        return v

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(key, "is required (a string)")
            return default
        if not isinstance(v, str) or (required and not v):
            raise ParameterError(key, f"expected a non-empty string, got {_kind(v)} {shown(v)}")
        return v

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(key, "is required (a list of strings)")
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ParameterError(key, f"expected a list of strings, got {shown(v)}")
        return list(v)

    def string_map(self, key: str, *, required: bool = False) -> dict[str, str]:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(key, "is required (a mapping of string to string)")
            return {}
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise ParameterError(key, f"expected a mapping of string to string, got {shown(v)}")
        return dict(v)

    def ignore(self, *keys: str) -> None:
        """Parameters the reference picker takes that do not apply here; accepted so its configs load."""
        self._read.update(keys)

    def done(self) -> None:
        unknown = sorted(k for k in self._values if k not in self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise ParameterError(unknown[0], f"unknown parameter; this plugin takes: {known}")
