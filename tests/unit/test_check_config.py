"""`epp check-config FILE...`: validates without serving, prints the effective profiles, plugins with
their parameters and deprecations; exit 0 valid, 2 invalid with a message naming the file and field."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from extproc.cli import main as cli

GOOD = """\
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
  parameters: {blockSize: 128}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""


def write(tmp_path: Path, text: str, name: str = "epp.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check(capsys, *files: str) -> tuple[int, str, str]:
    rc = cli.main(["check-config", *files])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_valid_config_exits_0_and_prints_its_profiles(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    rc, out, err = check(capsys, path)
    assert rc == 0 and err == ""
    assert out.splitlines()[:5] == [
        f"{path}: valid (llm-d.ai/v1)",
        "  profile handler: single-profile-handler",
        "  profile default:",
        "    scorers: queue-scorer x2, prefix-cache-scorer x3",
        "    picker: max-score-picker (implied)",
    ]


def test_plugins_are_printed_with_their_parameters_defaults_filled_in(tmp_path, capsys):
    _, out, _ = check(capsys, write(tmp_path, GOOD))
    assert "    prefix-cache-scorer: blockSize=128, maxPrefixBlocksToMatch=256, lruCapacityPerServer=31250, autoTune=true" in out
    assert "    queue-scorer\n" in out


def test_deprecations_are_printed(tmp_path, capsys):
    text = GOOD.replace("llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1")
    rc, out, _ = check(capsys, write(tmp_path, text))
    assert rc == 0
    assert "  warning: DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated" in out


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("type: queue-scorer", "type: queue-scorr"), "plugins[0].type: unknown plugin type 'queue-scorr'"),
        (GOOD.replace("blockSize: 128", "blockSize: big"), "plugins[1].parameters.blockSize: prefix-cache-scorer: expected an integer"),
        (GOOD + "flowControl: {maxBytes: lots}\n", "flowControl.maxBytes: expected a Kubernetes quantity"),
        (GOOD + "saturationDetector: {pluginRef: nope}\n", "saturationDetector.pluginRef: no plugin named 'nope'"),
        (
            "a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
            "refused: aliases repeat more than 10,000 nodes",
        ),
    ],
    ids=["unknown-type", "bad-parameter", "flow-control", "saturation-detector", "yaml-bomb"],
)
def test_an_invalid_config_exits_2_naming_the_file_and_field(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    rc, out, err = check(capsys, path)
    assert rc == 2 and out == ""
    assert err.startswith(f"epp: configuration error: {path}: ")
    assert expected in err
    assert "Traceback" not in err


def test_a_directory_exits_2(tmp_path, capsys):
    rc, _, err = check(capsys, str(tmp_path))
    assert rc == 2
    assert err == f"epp: configuration error: {tmp_path}: cannot read the config file: not a regular file\n"


def test_a_100_mb_file_exits_2_without_reading_it(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: the size is what is refused
    rc, _, err = check(capsys, str(path))
    assert rc == 2
    assert err == f"epp: configuration error: {path}: refused: 104,857,600 bytes; the limit is 4,194,304 bytes (4 MiB)\n"


def test_a_missing_file_exits_2(tmp_path, capsys):
    rc, _, err = check(capsys, str(tmp_path / "nope.yaml"))
    assert rc == 2
    assert err == f"epp: configuration error: {tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory\n"


def test_every_file_is_checked_and_one_bad_file_makes_it_exit_2(tmp_path, capsys):
    good = write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, "kind: Pod\n", "bad.yaml")
    rc, out, err = check(capsys, bad, good)
    assert rc == 2
    assert f"{good}: valid" in out and f"{bad}: apiVersion" in err


def test_dash_reads_the_config_from_standard_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GOOD.encode())))
    rc, out, _ = check(capsys, "-")
    assert rc == 0 and out.startswith("<stdin>: valid (llm-d.ai/v1)\n")
