"""The shape the code keeps: no function under src/ longer than 80 lines. (Modules are split by concern, not by
length: tests/unit/test_architecture.py holds the layers.)"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_FUNCTION_LINES = 80


def test_functions_stay_short() -> None:
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(SRC)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not too_long, "split these:\n" + "\n".join(too_long)
