"""Reading a plugin's `parameters` mapping: typed getters that name the field and what was expected.

A plugin reads each parameter it knows, then calls `done()`, which refuses any it did not read, so a
misspelt parameter is an error rather than a silently ignored default. Every getter records the value
it returned (the default when the parameter is absent): `effective` is what `epp check-config` prints.
`deprecated()` accepts a parameter whose value changes nothing and records a warning that says so.
`done(llmd_ignores=True)` is for plugin types whose llm-d factory reads no parameters at all: there an
unknown parameter loads with a warning naming it (llm-d ignores it too), rather than being refused.
`section()` reads a nested mapping (llm-d's `kvEventsConfig: {...}`) with the same getters: its fields
are named `kvEventsConfig.topicFilter` in errors, and its effective values nest under its key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pickers.framework.errors import ConfigError, shown


class ParameterError(ConfigError):
    """A parameter is wrong. `param` is its name; the config loader prefixes the path to the plugin."""

    def __init__(self, param: str, detail: str) -> None:
        self.param = param
        self.detail = detail
        super().__init__(detail, field=param)


_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float | None:
    """Go's time.ParseDuration, in seconds (`0` needs no unit; a leading sign is allowed); None if malformed."""
    t = text.strip()
    sign = -1.0 if t.startswith("-") else 1.0
    if t[:1] in ("+", "-"):
        t = t[1:]
    if t == "0":
        return 0.0
    if not t:
        return None
    pos, total = 0, 0.0
    for m in _GO_DURATION.finditer(t):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total if pos == len(t) and pos > 0 else None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Params:
    def __init__(self, parameters: Mapping[str, Any] | None, *, prefix: str = "", warnings: list[str] | None = None) -> None:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping):
            raise ParameterError(prefix.rstrip("."), f"expected a mapping of parameters, got {_kind(parameters)}")
        self.prefix = prefix  # "kvEventsConfig." for a section: errors name the whole path
        self._values = dict(parameters)
        self._read: set[str] = set()
        self.effective: dict[str, Any] = {}  # parameter -> the value the plugin runs with
        self.warnings: list[str] = [] if warnings is None else warnings  # a section shares its parent's
        self._sections: list[Params] = []

    def path(self, key: str) -> str:
        """`key` as the config names it: with the section's path in front."""
        return self.prefix + key

    def section(self, key: str) -> Params:
        """A nested mapping of parameters (absent: an empty one, so its getters give their defaults)."""
        v = self._get(key)
        if v is not None and not isinstance(v, Mapping):
            raise ParameterError(self.path(key), f"expected a mapping, got {_kind(v)} {shown(v)}")
        child = Params(v, prefix=self.path(key) + ".", warnings=self.warnings)
        self.effective[key] = child.effective
        self._sections.append(child)
        return child

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._values.get(key)

    def given(self, key: str) -> bool:
        """Whether the config sets `key` (to anything but null)."""
        return self._values.get(key) is not None

    def _keep(self, key: str, value: Any) -> Any:
        self.effective[key] = value
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = None) -> int:
        v = self._get(key)
        if v is None:
            return self._keep(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParameterError(self.path(key), f"expected an integer, got {_kind(v)} {shown(v)}")
        if minimum is not None and v < minimum:
            raise ParameterError(self.path(key), f"expected an integer >= {minimum}, got {v}")
        return self._keep(key, v)

    def number(self, key: str, default: float, *, minimum: float | None = None, positive: bool = False) -> float:
        v = self._get(key)
        if v is None:
            return self._keep(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ParameterError(self.path(key), f"expected a number, got {_kind(v)} {shown(v)}")
        if positive and v <= 0:
            raise ParameterError(self.path(key), f"expected a positive number, got {v}")
        if minimum is not None and v < minimum:
            raise ParameterError(self.path(key), f"expected a number >= {minimum}, got {v}")
        return self._keep(key, float(v))

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return self._keep(key, default)
        if not isinstance(v, bool):
            raise ParameterError(self.path(key), f"expected true or false, got {_kind(v)} {shown(v)}")
        return self._keep(key, v)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(self.path(key), "is required (a string)")
            return self._keep(key, default)
        if not isinstance(v, str) or (required and not v):
            raise ParameterError(self.path(key), f"expected a non-empty string, got {_kind(v)} {shown(v)}")
        return self._keep(key, v)

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(self.path(key), "is required (a list of strings)")
            return self._keep(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ParameterError(self.path(key), f"expected a list of strings, got {shown(v)}")
        return self._keep(key, list(v))

    def string_map(self, key: str, *, required: bool = False) -> dict[str, str]:
        v = self._get(key)
        if v is None:
            if required:
                raise ParameterError(self.path(key), "is required (a mapping of string to string)")
            return self._keep(key, {})
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise ParameterError(self.path(key), f"expected a mapping of string to string, got {shown(v)}")
        return self._keep(key, dict(v))

    def mappings(self, key: str) -> list[Mapping[str, Any]]:
        """A list of mappings (e.g. `matchExpressions`), each for the plugin to check; [] when left out."""
        v = self._get(key)
        if v is None:
            return self._keep(key, [])
        if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
            raise ParameterError(self.path(key), f"expected a list of mappings, got {shown(v)}")
        return self._keep(key, [dict(x) for x in v])

    def duration_or(self, key: str, default: str) -> float:
        """A Go duration string with a default (llm-d's `timeout: "5s"`), in seconds; left out or "" it
        is the default's. The effective value is the string."""
        v = self._get(key)
        text = default if v is None or v == "" else v
        seconds = parse_go_duration(text) if isinstance(text, str) else None
        if seconds is None or seconds < 0:
            raise ParameterError(self.path(key), f"expected a duration such as \"5s\" or \"250ms\", got {_kind(v)} {shown(v)}")
        self._keep(key, text)
        return seconds

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.string(key, default)
        if v not in choices:
            raise ParameterError(self.path(key), f"expected one of {', '.join(choices)}, got {shown(v)}")
        return v  # type: ignore[return-value]

    def refused(self, key: str, why: str, *, allowed: Callable[[Any], bool] | None = None) -> None:
        """A parameter llm-d takes and llm-epp cannot honour: given (and not `allowed`), it is refused
        with `why`; absent (or allowed) it loads and shows as given."""
        v = self._get(key)
        if v is None:
            return
        if allowed is not None and allowed(v):
            self._keep(key, v)
            return
        raise ParameterError(self.path(key), f"not supported: {why}")
    def port(self, key: str) -> int | None:
        """An optional TCP port, 1-65535; None when left out."""
        v = self._get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535):
            raise ParameterError(self.path(key), f"expected a port 1-65535, got {_kind(v)} {shown(v)}")
        return self._keep(key, v)

    def duration(self, key: str) -> float | None:
        """A Go duration string (`500ms`, `1s`, `1m30s`) in seconds; None when left out or 0."""
        v = self._get(key)
        if v is None or v == "":
            return self._keep(key, None)
        seconds = parse_go_duration(v) if isinstance(v, str) else None
        if seconds is None or seconds < 0:
            raise ParameterError(self.path(key), f"expected a duration like 500ms, 1s or 1m30s, got {_kind(v)} {shown(v)}")
        self._keep(key, v if seconds else None)
        return seconds or None

    def nanos_or_duration(self, key: str) -> float | None:
        """A Go time.Duration field decoded from JSON (llm-d-kv-cache's), in seconds; None when left out
        or not positive (llm-d-kv-cache: `> 0` turns it on). Go's JSON gives it as integer nanoseconds
        (60000000000 is a minute); a duration string (`1m`) reads the same. The effective value is as given."""
        v = self._get(key)
        if v is None or v == "":
            return self._keep(key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            seconds: float | None = v / 1e9
        else:
            seconds = parse_go_duration(v) if isinstance(v, str) else None
        if seconds is None:
            raise ParameterError(self.path(key), f"expected nanoseconds (60000000000) or a duration like 1m, got {_kind(v)} {shown(v)}")
        self._keep(key, v if seconds > 0 else None)
        return seconds if seconds > 0 else None

    def deprecated(self, key: str, why: str) -> None:
        """A parameter the reference picker also accepts and does nothing with (`why` says so); when given,
        it is accepted with a warning, never silently."""
        v = self._get(key)
        if v is not None:
            self.warnings.append(f"parameter {self.path(key)} is deprecated and has no effect: {why}")

    def done(self, *, llmd_ignores: bool = False) -> None:
        """Refuse the parameters no getter read. With `llmd_ignores` (the plugin type's llm-d factory
        does not read its parameters: `func XFactory(name string, _ *json.Decoder, ...)`) each one loads
        with a warning instead: it has no effect there either, and a config written for llm-d loads."""
        unknown = sorted(k for k in self._values if k not in self._read)
        if unknown and llmd_ignores:
            for k in unknown:
                self.warnings.append(
                    f"parameter {self.path(k)} has no effect: this plugin type takes no such parameter, and "
                    "llm-d ignores it too (its factory for this type reads no parameters)"
                )
            unknown = []
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            where = f"{self.prefix.rstrip('.')} takes" if self.prefix else "this plugin takes"
            raise ParameterError(self.path(unknown[0]), f"unknown parameter; {where}: {known}")
        for child in self._sections:
            child.done()
