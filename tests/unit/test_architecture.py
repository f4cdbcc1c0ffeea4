"""The layout as drawn in docs/development.md: folders by role, dependencies pointing one way.

Every import of the product packages (at module level, in functions and under TYPE_CHECKING alike) is
read with `ast`; a folder is the package a module sits in. The rules:
- no cycle between folders (a folder may use another only if that one never comes back to it);
- `pickers` (the scheduling library) never imports `extproc` (the server);
- product code never imports the simulator, the benchmarks or the tests;
- each folder stays small enough to read (about ten modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("extproc", "pickers", "pd_sidecar")
NOT_FOR_PRODUCT = ("vllm_sim", "bench", "tests")
MAX_MODULES = 12  # "about ten": pickers/plugins/scorer/{affinity,load} hold one module per scorer


def modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every module of these packages under root."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def folder_of(module: str, known: Mapping[str, Path]) -> str:
    path = known[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules this one imports (absolute names, as far as they are known modules or packages)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import submodule` imports the submodule
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def folder_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """folder -> the other product folders its modules import."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        src = folder_of(module, known)
        deps = graph.setdefault(src, set())
        for imported in imports_of(module, path, known):
            target = imported
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target:
                dst = folder_of(target, known)
                if dst != src:
                    deps.add(dst)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more folders (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_two_folders_import_each_other():
    graph = folder_graph(ROOT, PRODUCT)
    assert cycles(graph) == [], "folders that import each other (directly or round a loop)"


def test_the_checker_finds_a_cycle_between_folders(tmp_path):
    # a miniature tree: a/ uses b/ and b/ uses a/ back, through a relative and an absolute import
    for pkg, body in {"a": "", "a/x": "from ..b import y\n", "b": "", "b/y": "def f():\n    import app.a.x\n",
                      "c": "import app.a.x\n"}.items():  # fmt: skip
        path = tmp_path / "app" / (f"{pkg}/__init__.py" if "/" not in pkg else f"{pkg}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    (tmp_path / "app" / "__init__.py").write_text("")
    graph = folder_graph(tmp_path, ["app"])
    assert cycles(graph) == [["app.a", "app.b"]]
    assert "app.a" in graph["app.c"]  # a one-way use is no cycle


def test_the_scheduling_library_never_imports_the_server():
    graph = folder_graph(ROOT, PRODUCT)
    offenders = {src: sorted(d for d in deps if d.startswith("extproc")) for src, deps in graph.items() if src.startswith("pickers")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_product_code_never_imports_the_simulator_benchmarks_or_tests():
    known = modules(ROOT, PRODUCT)
    bad = {
        module: sorted(i for i in imports_of(module, path, known) if i.split(".")[0] in NOT_FOR_PRODUCT)
        for module, path in known.items()
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_each_folder_holds_about_ten_modules_at_most():
    known = modules(ROOT, PRODUCT)
    sizes: dict[str, int] = {}
    for module, path in known.items():
        if path.name not in ("__init__.py", "__main__.py"):
            sizes[folder_of(module, known)] = sizes.get(folder_of(module, known), 0) + 1
    assert {f: n for f, n in sizes.items() if n > MAX_MODULES} == {}


def test_docstrings_cite_nothing_outside_the_repository():
    # SPEC.md is a file of the team's, not of this repository: a reader cannot follow such a reference
    cited = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in modules(ROOT, (*PRODUCT, "vllm_sim", "bench", "tests")).values()
        if path.name != "test_architecture.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "SPEC section" in line or "SPEC.md" in line or "(SPEC)" in line
    ]
    assert cited == []
