"""The library/CLI boundary: `transformers_ext` is a library (torch, transformers, numpy, safetensors and the
standard library), the command line (`cli.py`) and the data layer (`utils_glue.py`) sit above it, and no
module imports in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "transformers_ext"
LIBRARY_DEPENDENCIES = {"torch", "transformers", "numpy", "safetensors"}
SCRIPT_MODULES = {p.stem for p in REPO.glob("*.py")}  # cli, utils_glue, run_glue, train_gate, ...


def _imports(file: Path) -> set[str]:
    """Every module a file imports, at any depth (a deferred import inside a function counts too), with
    relative imports of the package resolved to `transformers_ext.<name>`."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "transformers_ext" + (f".{node.module}" if node.module else "")
                names.update([base] if node.module else [f"{base}.{a.name}" for a in node.names])
            elif node.module != "__future__":
                names.add(node.module)
    return names


def test_importing_the_library_loads_no_command_line_or_data_layer():
    modules = [f"transformers_ext.{p.stem}" for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"]
    code = ("import sys, importlib\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SCRIPT_MODULES)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_imports_only_its_dependencies():
    allowed = LIBRARY_DEPENDENCIES | set(sys.stdlib_module_names) - {"argparse"}
    offenders = {}
    for file in sorted(PACKAGE.glob("*.py")):
        foreign = {n for n in _imports(file) if n.split(".")[0] not in allowed | {"transformers_ext"}}
        if foreign:
            offenders[file.name] = sorted(foreign)
    assert offenders == {}


def test_no_import_cycle():
    """The import graph of the repository's modules (scripts and package, deferred imports included) is
    acyclic."""
    files = {p.stem: p for p in REPO.glob("*.py")} | {f"transformers_ext.{p.stem}": p for p in PACKAGE.glob("*.py")}
    files["transformers_ext"] = files.pop("transformers_ext.__init__")
    graph = {name: {n for n in _imports(file) for n in (n, n.rsplit(".", 1)[0]) if n in files and n != name}
             for name, file in files.items()}
    for name in list(graph):  # a submodule import runs the package's __init__ first
        if name.startswith("transformers_ext."):
            graph[name].discard("transformers_ext")
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
