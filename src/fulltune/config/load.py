"""Loading a config: YAML and dotted `key=value` overrides, foreign names (`names`: Hugging Face Trainer's
`learning_rate`, other configs' `training.lr`, the layout of a CLIP fine-tuning config.yaml) rewritten to fulltune's
keys, types checked and coerced (`coercion`: unknown keys and wrong types are errors naming the key and the valid
choices), then the checks of `checks`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from fulltune.config.checks import validate
from fulltune.config.coercion import build
from fulltune.config.names import ALIASES, apply_implied_settings, layout_key, translate
from fulltune.config.sections import Config
from fulltune.config.yamlfile import read_yaml
from fulltune.errors import ConfigError

FREE_FORM_KEYS = ("model.tiny_config", "data.class_names", "data.data_files", "training.layer_groups_lr")
"""Keys whose value is a mapping of the user's own keys, not a section."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def dotted_items(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'training': {'num_epochs': 3}} -> [('training.num_epochs', 3)]. A free-form mapping stays one value, and so
    does a mapping under a one-key alias (`learning_rate: {...}`: the error names the key it is an alias of)."""
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and layout_key(full) not in (*FREE_FORM_KEYS, *ALIASES):
            items.extend(dotted_items(value, full))
        else:
            items.append((full, value))
    return items


def _canonical_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """The nested tree of fulltune's keys: foreign names translated (`names.translate`), implied settings added."""
    tree: dict[str, Any] = {}
    for dotted, value in dotted_items(raw):
        _set_dotted(tree, *translate(dotted, value))
    apply_implied_settings(tree)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """`training.base_learning_rate=1e-5` -> ('training.base_learning_rate', 1e-5), values parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. training.base_learning_rate=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = read_yaml(raw, f"override '{key}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = read_yaml(p.read_text(encoding="utf-8"), f"config file '{p}'")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file '{p}': not UTF-8 text (byte {err.start}); is it a YAML file?") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{p}'{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': expected a mapping of sections at the top level")
        raw = loaded
    tree = _canonical_tree(raw)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        _set_dotted(tree, *translate(key, value, say_layout=False))
    apply_implied_settings(tree)
    cfg = build(Config, tree)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in checkpoints)."""
    cfg = build(Config, _canonical_tree(values))
    validate(cfg)
    return cfg
