"""The shape of the package cannot rot: no import circle between its modules and no import from a
lower layer to a higher one (DESIGN.md §4). Imports inside functions count as much as those at
the top; only imports under `if TYPE_CHECKING:` (annotations, never run) are left out.

The layers, top to bottom; a module may import its own layer or any layer below it:

    faces      cli, api, __main__                 the Typer commands and the Python API
    stages     stages/*                           read + verify, call the core, write
    services   run_dir, launcher, workers, plots, render   the run directory, executors, figures
    config     config, plugins                    compose + validate; user code enters
    core       core/*                             the computation: no files
    registries models/*, data/*                   name -> builder
    leaves     errors, names, readers, storage, determinism, contracts, progress, meta
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "magic_cli"
LAYERS = [
    ("faces", ("cli", "api", "__main__")),
    ("stages", ("stages",)),
    ("services", ("run_dir", "launcher", "workers", "plots", "render")),
    ("config", ("config", "plugins")),
    ("core", ("core",)),
    ("registries", ("models", "data")),
    ("leaves", ("errors", "names", "readers", "storage", "determinism", "contracts", "progress", "meta")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__: the public face, above everything
        return -1
    for index, (_, heads) in enumerate(LAYERS):
        if parts[1] in heads:
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_structure.py")


def _type_checking_nodes(tree) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports (a package's __init__ when named as one)}."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and target != "magic_cli":
                    edges[module].add(target)
    return edges


def _circles(edges) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _circles(import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, targets in import_graph().items() for b in targets if _layer(b) < _layer(a)]
    assert upward == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The two checks can fail: a made-up graph with one circle and one upward arrow."""
    edges = {"magic_cli.core.a": {"magic_cli.core.b"}, "magic_cli.core.b": {"magic_cli.core.a"},
             "magic_cli.errors": {"magic_cli.cli"}, "magic_cli.cli": set()}
    assert _circles(edges) == [["magic_cli.core.a", "magic_cli.core.b"]]
    assert _layer("magic_cli.cli") < _layer("magic_cli.errors")
