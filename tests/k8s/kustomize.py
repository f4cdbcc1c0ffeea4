"""`kubectl kustomize` for the manifest tests: a kustomization rendered as kubectl would apply it.

Tests that need it are skipped, with that reason, where kubectl (with its built-in kustomize) is not
on PATH; a kustomization that kubectl refuses fails the test with kubectl's message.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not on PATH")


def render(path: Path, *, components: tuple[str, ...] = (), tree: Path | None = None) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize path` builds. components: extra components to enable, as a user
    would by uncommenting them: the tree holding `path` (`tree`, its manifests/ folder) is copied to a
    temporary folder and the copy's kustomization lists them."""
    assert KUBECTL is not None
    if not components:
        return _kustomize(path)
    assert tree is not None and path.is_relative_to(tree)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / tree.name
        shutil.copytree(tree, copy)
        target = copy / path.relative_to(tree)
        k = yaml.safe_load((target / "kustomization.yaml").read_text())
        k["components"] = [*k.get("components", []), *components]
        (target / "kustomization.yaml").write_text(yaml.safe_dump(k))
        return _kustomize(target)


def _kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
