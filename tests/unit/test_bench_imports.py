"""The bench scripts import fulltune inside functions (so `--help` stays fast): a rename in src/ would only show
when a benchmark runs. Every `from fulltune... import name` in bench/ must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _imports(path: Path) -> list[tuple[int, str, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fulltune"
        for alias in node.names
    ]


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_imports_resolve(script: Path) -> None:
    missing = []
    for line, module, name in _imports(script):
        owner = importlib.import_module(module)
        if hasattr(owner, name):
            continue
        try:  # `from fulltune import planning`: a submodule not yet imported
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{script.name}:{line}: {module}.{name}")
    assert not missing, "bench imports names that fulltune no longer has:\n" + "\n".join(missing)
