"""The shape the code keeps (issue 10): no function under src/ longer than 80 lines, no module over 450."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def test_functions_and_modules_stay_short() -> None:
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(SRC)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {n} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_long, "split these:\n" + "\n".join(too_long)
