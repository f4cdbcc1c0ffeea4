"""scripts/extract-endpoint-picker-configs pulls EndpointPickerConfig documents out of Helm values,
ConfigMaps, plain YAML and README blocks, once each, so `epp check-config` can load a whole repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extproc.cli import main as cli

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "extract-endpoint-picker-configs"
EPC = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"


def test_configs_are_found_wherever_they_are_embedded_and_written_once(tmp_path, capsys):
    src, out = tmp_path / "repo", tmp_path / "out"
    (src / "guides" / "router").mkdir(parents=True)
    indented = "".join(f"        {line}\n" for line in EPC.splitlines())
    (src / "guides" / "router" / "values.yaml").write_text(
        f"router:\n  epp:\n    pluginsCustomConfig:\n      custom.yaml: |\n{indented}"
    )
    (src / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\ndata:\n  epp.yaml: |\n" + "".join(f"    {x}\n" for x in (EPC + "- type: kv-cache-utilization-scorer\n").splitlines()))
    (src / "README.md").write_text(f"# Guide\n\n```yaml\n{EPC}```\n\nand again:\n\n```yaml\n{EPC}```\n")
    (src / "template.yaml").write_text("kind: EndpointPickerConfig\nplugins: {{ .Values.plugins }}\n  bad: [\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(src), str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "2 EndpointPickerConfig documents written" in run.stderr  # the README's copies are the values' one
    assert "skipped (not plain YAML): template" in run.stderr
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 2
    assert cli.main(["check-config", *map(str, files)]) == 0
    capsys.readouterr()


def test_a_missing_folder_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "not a folder" in run.stderr and "Traceback" not in run.stderr
