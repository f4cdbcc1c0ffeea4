"""Any config, however mangled, loads or is refused with a ConfigError naming the file: never another
exception. Each example takes one of our guide-shaped or built-in configs and replaces one node, at any
depth, with a value of some other shape."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pickers.config.loader import load_config
from pickers.config.strategies import CONFIGS
from pickers.framework.errors import ConfigError

SOURCES = sorted((Path(__file__).parent / "configs" / "guides").glob("*.yaml")) + sorted(Path(CONFIGS).glob("*.yaml"))
DOCS = [yaml.safe_load(p.read_text()) for p in SOURCES]

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.sampled_from(["", "queue-scorer", "nope", "-1", "1e400", "prefill", "decode", "x" * 300]),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _replaced(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {k: (_replaced(v, rest, value) if k == head else v) for k, v in node.items()}
    return [(_replaced(v, rest, value) if i == head else v) for i, v in enumerate(node)]


@st.composite
def mangled(draw) -> str:
    doc = draw(st.sampled_from(DOCS))
    path = draw(st.sampled_from(_paths(doc)))
    return yaml.safe_dump(_replaced(doc, path, draw(ODD_VALUES)), sort_keys=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled())
def test_a_mangled_config_loads_or_is_refused_naming_the_file(text):
    logging.disable(logging.WARNING)
    try:
        load_config(text, "mangled.yaml")
    except ConfigError as e:
        assert str(e).startswith("mangled.yaml"), str(e)
    finally:
        logging.disable(logging.NOTSET)


def test_every_source_config_loads_as_it_is():
    assert len(DOCS) >= 7
    for p in SOURCES:
        load_config(p.read_text(), str(p))
