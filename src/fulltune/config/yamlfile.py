"""Reading YAML a user hands over (a config file, an override, a run's saved config.yaml): safe_load only (no
code runs), and a cap on what its aliases expand to."""

from __future__ import annotations

from typing import Any

import yaml

from fulltune.errors import ConfigError

MAX_CONFIG_VALUES = 100_000
"""A config holds a few hundred values; YAML aliases nested inside each other can make a tiny file stand for
billions (a "billion laughs" file), which writing config.yaml would expand. Beyond this many, it is refused."""


def _bounded(value: Any, where: str) -> Any:
    """`value` (parsed YAML) unchanged, or ConfigError when it expands, aliases followed, to over MAX_CONFIG_VALUES."""
    seen, stack = 0, [value]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: expands to over {MAX_CONFIG_VALUES:,} values (YAML aliases nested in each other?); "
                "a config is a few hundred"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def read_yaml(text: str, where: str) -> Any:
    """yaml.safe_load of untrusted text (no code runs), refused when its aliases expand it beyond any real config."""
    return _bounded(yaml.safe_load(text), where)
