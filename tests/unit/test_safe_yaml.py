"""Hostile files: every YAML file the EPP reads is bounded in size, in nodes and in what aliases may
repeat, and every way a file can fail is one ConfigError that names it; error messages never print
a refused value whole."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.datalayer.endpoints_file import load_endpoints_file
from extproc.requestcontrol.objectives import load_objectives_file
from extproc.requestcontrol.rewrites import load_rewrites_file
from pickers.config import safe_yaml
from pickers.config.loader import load_config, load_config_file
from pickers.framework.errors import ConfigError, shown


def alias_bomb(levels: int = 9, key: str = "") -> str:
    """The "billion laughs": each level lists the previous one 9 times, so `levels` 9 expands to
    9**9 strings from 414 bytes."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f"{key}{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{key}{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def refused(text: str, **limits: int) -> str:
    with pytest.raises(ConfigError) as err:
        safe_yaml.parse(text, source="f.yaml", **limits)
    return str(err.value)


# -- the limits -----------------------------------------------------------------------------------


def test_an_alias_bomb_is_refused_naming_the_file_and_why() -> None:
    assert refused(alias_bomb()).startswith("f.yaml: refused: aliases repeat more than 10,000 nodes (a YAML alias bomb?)")


def test_a_merge_key_bomb_is_refused() -> None:
    text = "a: &a {k0: 0, k1: 1, k2: 2}\n" + "".join(
        f"{n}: &{n} {{<<: [{', '.join([f'*{p}'] * 9)}]}}\n" for p, n in zip("abcdefg", "bcdefgh")
    )
    assert "aliases repeat more than" in refused(text)


def test_a_few_aliases_and_merge_keys_still_load() -> None:
    text = "defaults: &d {port: 8000, labels: {zone: a}}\none: {<<: *d, address: 10.0.0.1}\nlist: [*d, *d]\n"
    doc = safe_yaml.parse(text, source="f.yaml")
    assert doc["one"] == {"port": 8000, "labels": {"zone": "a"}, "address": "10.0.0.1"}
    assert doc["list"] == [doc["defaults"], doc["defaults"]]


def test_aliases_count_what_they_repeat_not_how_often_they_appear() -> None:
    text = "big: &b [" + ", ".join(["x"] * 50) + "]\nuses: [*b, *b]\n"  # 2 aliases, 102 nodes repeated
    assert safe_yaml.parse(text, source="f.yaml", max_alias_nodes=102)["uses"][1][49] == "x"
    assert "aliases repeat more than 101 nodes" in refused(text, max_alias_nodes=101)


def test_a_recursive_alias_is_refused() -> None:
    assert "alias *a is inside its own anchor" in refused("a: &a [1, *a]\n")


def test_more_nodes_than_the_limit_are_refused_where_they_cross_it() -> None:
    message = refused("[" + ", ".join(["x"] * 20) + "]", max_nodes=10)
    assert message == "f.yaml: refused: more than 10 YAML nodes; split the file or write less (line 1, column 29)"


def test_nesting_past_the_limit_is_refused() -> None:
    assert f"nested more than {safe_yaml.MAX_DEPTH} levels deep" in refused("[" * 150 + "]" * 150)


def test_a_text_over_the_size_limit_is_refused() -> None:
    assert refused("a: 1234567890\n", max_bytes=10).startswith("f.yaml: refused: 14 characters; the limit is 10 bytes")


def test_the_limits_hold_for_a_whole_multi_document_stream() -> None:
    doc = "---\na: &x [1, 2, 3, 4]\nb: [*x, *x, *x]\n"  # 3 x 5 nodes repeated per document
    assert len(safe_yaml.parse_all(doc * 2, source="f.yaml", max_alias_nodes=30)) == 2
    with pytest.raises(ConfigError, match="aliases repeat more than 29 nodes"):
        safe_yaml.parse_all(doc * 2, source="f.yaml", max_alias_nodes=29)


# -- every way a text fails is a ConfigError ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [\n", "invalid YAML at line 2, column 1: did not find expected node content"),
        ("a: *nowhere\n", "invalid YAML at line 1, column 4: found undefined alias 'nowhere'"),
        ("a: " + "9" * 5000 + "\n", "invalid YAML value: Exceeds the limit (4300 digits)"),
        ("a: 2024-13-45\n", "invalid YAML value: month must be in 1..12"),
        ("a: !!python/object:os.system {}\n", "invalid YAML at line 1, column 4: could not determine a constructor"),
        ("a: 1\n---\nb: 2\n", "invalid YAML at line 2, column 1: but found another document"),
    ],
    ids=["syntax", "undefined-alias", "huge-integer", "bad-date", "python-tag", "two-documents"],
)
def test_every_decoding_failure_is_a_config_error(text: str, message: str) -> None:
    assert refused(text).startswith(f"f.yaml: {message}")


def test_libyaml_parses_when_pyyaml_has_it() -> None:
    assert safe_yaml.LIBYAML == yaml.__with_libyaml__


# -- reading files ------------------------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("x" * 100)
    with pytest.raises(ConfigError) as err:
        safe_yaml.read_text(path, what="endpoints file", max_bytes=64)
    assert str(err.value) == f"{path}: refused: 100 bytes; the limit is 64 bytes"


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: cannot read the config file: not UTF-8 text \(byte 9\)"):
        safe_yaml.read_text(path, what="config file")


def test_a_fifo_in_place_of_the_file_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    errors: list[str] = []

    def read() -> None:
        try:
            safe_yaml.read_text(path, what="endpoints file")
        except ConfigError as e:
            errors.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): unblock it so the test can end
        with open(path, "w"):
            pass
        reader.join(5)
        pytest.fail("reading a FIFO blocked")
    assert errors == [f"{path}: cannot read the endpoints file: not a regular file"]


# -- every file the EPP reads goes through the limits ----------------------------------------------

LOADERS: dict[str, Callable[[Path], Any]] = {
    "endpoints": load_endpoints_file,
    "config": load_config_file,
    "objectives": load_objectives_file,
    "model-rewrites": load_rewrites_file,
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_every_file_loader_refuses_an_alias_bomb(tmp_path: Path, loader: Callable[[Path], Any]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(ConfigError, match="aliases repeat more than 10,000 nodes") as err:
        loader(path)
    assert err.value.source == str(path)


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_every_file_loader_refuses_a_file_over_the_size_limit(tmp_path: Path, loader: Callable[[Path], Any]) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (safe_yaml.MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"refused: 4,194,31\d bytes; the limit is 4,194,304 bytes \(4 MiB\)"):
        loader(path)


def test_inline_config_text_has_the_limits_too() -> None:
    with pytest.raises(ConfigError, match=r"^--config-text: refused: aliases repeat"):
        load_config(alias_bomb(), "--config-text")


# -- error messages repeat a short piece of the value ----------------------------------------------


def test_shown_cuts_a_huge_value_without_building_its_repr() -> None:
    bomb: list[Any] = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 strings when printed whole: gigabytes
    text = shown(bomb)
    assert len(text) <= 100 and text.startswith("[[[[...], [...]") and text.endswith("...")


@pytest.mark.parametrize(
    ("value", "expected"), [("abc", "'abc'"), (8, "8"), ({"address": "a"}, "{'address': 'a'}"), (["x"], "['x']"), (None, "None")]
)
def test_shown_is_repr_for_short_values(value: object, expected: str) -> None:
    assert shown(value) == expected


def test_a_long_value_in_an_endpoints_error_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints:\n  - {address: a, port: 1, labels: {gpu: [" + ", ".join(["x" * 50] * 1000) + "]}}\n")
    with pytest.raises(ConfigError) as err:
        load_endpoints_file(path)
    message = str(err.value).removeprefix(f"{path}: ")
    assert message.startswith("endpoints[0].labels.gpu: expected a string (quote it), got ['xxxx") and len(message) < 160


def test_config_errors_cap_their_field_and_message() -> None:
    err = ConfigError("expected one of " + "a, " * 5000, source="f.yaml", field="labels." + "k" * 5000)
    assert len(str(err)) < 4300 and err.field is not None and len(err.field) == 200 and str(err).endswith("...")
