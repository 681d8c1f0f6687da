"""The layers of docs/architecture.md, read from the code with `ast`: no import cycle among fulltune's modules, no
import of a higher layer, and no import of a fulltune module inside a function (except in `cli/`, whose command
modules load what they run on demand, so that `fulltune --help` stays fast, and the package's lazy `fulltune.train`
and friends, which load `fulltune.api` on first use so that `import fulltune` stays light)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "units"),
    ("config",),
    ("files", "runtime"),
    ("speed",),
    ("data",),
    ("report",),
    ("model",),
    ("state",),
    ("eval",),
    ("training",),
    ("clip", "prune", "planning", "tune"),
    ("compare", "demo"),
    ("cli", "api", "__main__", "__init__"),
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "fulltune").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The fulltune modules an import statement loads."""
    names = []
    if isinstance(node, ast.ImportFrom):
        assert node.level == 0, f"{module}: relative import"
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            names.append(full if full in MODULES else node.module or "")
    else:
        names = [alias.name for alias in node.names]
    return [n for n in names if n.startswith("fulltune")]


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported fulltune module, inside a function)]."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(t, id(node) not in top) for t in _target(module, node)]
        out[module] = found
    return out


IMPORTS = _imports()


def _layer(module: str) -> int:
    parts = module.split(".")
    return LEVEL[parts[1] if len(parts) > 1 else "__init__"]


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if (m.split(".") + ["__init__"])[1] not in LEVEL]


def test_no_import_of_a_higher_layer():
    wrong = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, found in IMPORTS.items()
        for t, _ in found
        if t in MODULES and _layer(t) > _layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_fulltune_import_inside_a_function_outside_cli():
    inside = sorted({f"{m} -> {t}" for m, found in IMPORTS.items() for t, nested in found if nested})
    # cli/ loads command modules' work on demand; the package loads its Python API on first use (PEP 562)
    inside = [line for line in inside if not line.startswith("fulltune.cli") and line != "fulltune -> fulltune.api"]
    assert not inside, "\n".join(inside)


def test_no_import_cycle():
    # The package's lazy attributes (fulltune.train -> fulltune.api) load on first use, after any import: no edge.
    graph = {
        m: {t for t, nested in found if t in MODULES and t != m and not (m == "fulltune" and nested)}
        for m, found in IMPORTS.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
