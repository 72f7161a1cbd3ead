"""The layout's rules (README "Layout"), read from the source with `ast`: no import cycles, training
never imports inference, recipes import only the launcher's recipe module.

Imports inside functions count: a lazy import that closes a cycle is still a cycle, only one that
surfaces later. Imports under `if TYPE_CHECKING:` do not: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    """Every module name an import statement of `name` can reach, as written (absolute or relative)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # never runs
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (an import of a.b.c also runs a and a.b, unless
    they are packages the importer itself lives in: those have run already)."""
    mods = modules(*packages)
    graph = {}
    for name, path in mods.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in imported(name, path):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in mods and (prefix == target or prefix not in own):
                    edges.add(prefix)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    graph = import_graph("launcher", "recipes")
    assert cycles(graph) == []


def test_training_never_imports_inference():
    graph = import_graph("launcher")
    train = [name for name in graph if name.startswith("launcher.train.")]
    assert train, "no launcher/train/ modules found"
    assert [(name, e) for name in train for e in sorted(graph[name]) if e.startswith("launcher.after")] == []


def test_recipes_import_only_the_recipe_module_of_the_launcher():
    graph = import_graph("launcher", "recipes")
    allowed = {"launcher", "launcher.recipe"}  # the package itself holds only its docstring and version
    recipes = [name for name in graph if name.startswith("recipes")]
    assert recipes, "no recipes/ modules found"
    found = [(name, e) for name in recipes for e in sorted(graph[name]) if e.startswith("launcher")]
    assert [(name, e) for name, e in found if e not in allowed] == []
