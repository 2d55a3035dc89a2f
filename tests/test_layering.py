"""The package's shape: one installed namespace, imports that only go down, no cycle.

Layers, from the bottom: core (``resunetpp``: model, blocks, data, preprocessing, checkpoints,
metrics, sources ...) < ``resunetpp.engines`` < ``resunetpp.export`` < ``resunetpp.bench`` <
``resunetpp.cli``. Every import of every module counts -- at the top, inside a function (a lazy
import hides a dependency, it does not remove it) and under ``if TYPE_CHECKING:``. The folder ->
package map is read from pyproject.toml, the same table setuptools installs from.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "engines", "export", "bench", "cli")
#: Entry points and the public face sit above everything they start or re-export: ``resunetpp``'s
#: ``__init__`` lazily re-exports ``resunetpp.load`` (engines) and the model; nothing imports it back.
ENTRY_POINTS = {"resunetpp.__main__": "cli", "resunetpp": "cli"}


def package_dirs() -> dict[str, Path]:
    """``{package: folder}`` from ``[tool.setuptools.package-dir]``."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: REPO / folder for pkg, folder in table.items()}


def module_files() -> dict[str, Path]:
    """Every installed module's dotted name -> its source file."""
    dirs = package_dirs()
    mapped = {d.resolve() for d in dirs.values()}
    result: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder)
            # a folder mapped to its own package (resunetpp.export -> export/) is not resunetpp's child
            if any(p.resolve() in mapped and p.resolve() != folder.resolve() for p in path.parents):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            result[".".join([pkg, *parts])] = path
    return result


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``resunetpp`` modules ``source`` imports, anywhere in it, resolved to known modules."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> None:
        while name and name not in known:  # ``from resunetpp.x import some_function`` -> resunetpp.x
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "resunetpp":
                    resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "resunetpp":
                continue
            for alias in node.names:  # ``from resunetpp import engines`` imports a module
                resolve(f"{target}.{alias.name}")
    found.discard(module)
    return found


def import_graph(extra: dict[str, str] | None = None) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for the installed tree, plus ``extra`` planted sources."""
    files = module_files()
    sources = {m: p.read_text() for m, p in files.items()}
    sources.update(extra or {})
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    known = set(sources)
    return {m: imported_modules(src, m, m in packages, known) for m, src in sources.items()}


def layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    return sub if sub in LAYERS[1:] else "core"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in graph.items() for d in deps
                  if rank[layer(d)] > rank[layer(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---- the tree as it is ------------------------------------------------------------------------------------------
def test_every_folder_maps_into_the_one_namespace() -> None:
    dirs = package_dirs()
    assert all(pkg == "resunetpp" or pkg.startswith("resunetpp.") for pkg in dirs)
    assert {"resunetpp", "resunetpp.engines", "resunetpp.export", "resunetpp.bench", "resunetpp.cli"} <= set(dirs)
    files = module_files()
    assert "resunetpp.engines.base" in files and "resunetpp.export.pipeline" in files
    assert not any(m.startswith(("resunetpp.export.", "resunetpp.engines.")) and "resunetpp/" in str(p.relative_to(REPO))
                   for m, p in files.items())


def test_imports_only_go_down() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


# ---- the checks catch what they claim to catch -------------------------------------------------------------------
def test_a_planted_upward_import_fails_the_rule() -> None:
    def added(planted: dict[str, str]) -> list[str]:
        before = set(upward_imports(import_graph()))
        return [v for v in upward_imports(import_graph(planted)) if v not in before]

    planted = {"resunetpp.planted": "def f():\n    from resunetpp.engines import open  # lazy, still counts\n"}
    assert added(planted) == ["resunetpp.planted (core) imports resunetpp.engines (engines)"]
    planted = {"resunetpp.engines.planted": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                            "    from resunetpp.export import pipeline\n"}
    assert added(planted) == ["resunetpp.engines.planted (engines) imports resunetpp.export.pipeline (export)"]
    assert added({"resunetpp.cli.planted": "from resunetpp.bench import harness\n"}) == []  # down is fine


def test_a_planted_cycle_is_found() -> None:
    planted = {"resunetpp.export.planted_a": "from resunetpp.export import planted_b\n",
               "resunetpp.export.planted_b": "def f():\n    from resunetpp.export.planted_a import x\n"}
    assert ["resunetpp.export.planted_a", "resunetpp.export.planted_b"] in cycles(import_graph(planted))


def test_relative_imports_resolve() -> None:
    known = {"resunetpp", "resunetpp.export", "resunetpp.export.calibration", "resunetpp.engines"}
    assert imported_modules("from . import calibration\nfrom .. import engines\n", "resunetpp.export.x", False,
                            known) == {"resunetpp.export.calibration", "resunetpp.engines"}


# ---- one way to run an artifact -----------------------------------------------------------------------------------
#: Calls that create a runtime's session: only engines/ may make them.
RUNTIME_CALLS = {"InferenceSession", "compile_model", "create_execution_context"}


@pytest.mark.parametrize("call", sorted(RUNTIME_CALLS))
def test_only_engines_create_runtime_sessions(call: str) -> None:
    offenders = []
    for module, path in module_files().items():
        if layer(module) == "engines":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name == call:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_a_bare_folder_import_is_refused_not_a_second_copy() -> None:
    import subprocess
    import sys

    for folder, package in (("export", "resunetpp.export"), ("engines", "resunetpp.engines"),
                            ("benchmarks", "resunetpp.bench"), ("cli", "resunetpp.cli")):
        done = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 1
        assert f"ImportError: import {package}, not {folder}" in done.stderr
