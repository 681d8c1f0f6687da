"""What each config key is: its default and its one-line description, read from the docstring under each field of
`config/sections.py` (what `fulltune config` and `--help` print)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from fulltune.config import sections as config_module
from fulltune.config.load import to_dict
from fulltune.config.sections import Config


def field_docs(module: Any = config_module) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} from the string literal under each dataclass field of config/sections.py."""
    tree = ast.parse(inspect.getsource(module))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        body = node.body
        for stmt, nxt in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                fields[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe_keys(
    cls: type = Config, prefix: str = "", docs: dict[str, dict[str, str]] | None = None
) -> dict[str, tuple[Any, str]]:
    """Every dotted config key -> (default, one-line description), in the order of config.py."""
    docs = field_docs() if docs is None else docs  # read once, not once per section
    hints = typing.get_type_hints(cls)
    defaults = to_dict(cls())
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            out.update(describe_keys(tp, f"{prefix}{f.name}.", docs))
        else:
            out[f"{prefix}{f.name}"] = (defaults[f.name], docs.get(cls.__name__, {}).get(f.name, ""))
    return out
