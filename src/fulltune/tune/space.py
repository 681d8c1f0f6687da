"""What `tune` searches: the default space of a method (its learning-rate range, warmup, weight decay, and layer-wise
decay or LoRA's rank and alpha where they apply), a `--space` YAML file of `key: {low, high, log}` / `key: [choices]`
over any config key, checked against the config, and one trial's values drawn from an Optuna trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fulltune.config import Config, load_config, to_dict
from fulltune.config.load import dotted_items
from fulltune.config.methods import SEARCH_LR_RANGE
from fulltune.config.yamlfile import read_yaml
from fulltune.errors import ConfigError

Space = dict[str, Any]
"""dotted config key -> {"low", "high", "log"} (a range), a list of choices, or one value (set, not searched)."""


def default_space(cfg: Config) -> Space:
    """The default search space of `cfg`'s method."""
    method = cfg.method.name
    low, high = SEARCH_LR_RANGE[method]
    space: Space = {
        "training.base_learning_rate": {"low": low, "high": high, "log": True},
        "training.warmup_ratio": {"low": 0.0, "high": 0.2, "log": False},
        "training.weight_decay": {"low": 0.0, "high": 0.1, "log": False},
    }
    if method in ("full", "partial"):  # pretrained blocks train: lower ones may want a smaller rate
        space["training.layerwise_lr.enabled"] = True
        space["training.layerwise_lr.decay_rate"] = {"low": 0.7, "high": 1.0, "log": False}
    if method in ("lora", "qlora"):
        space["method.lora.r"] = [4, 8, 16, 32]
        space["method.lora.alpha"] = [8.0, 16.0, 32.0, 64.0]
    return space


def _check_entry(key: str, spec: Any, where: str) -> Any:
    """One entry of a space, normalised: {"low", "high", "log"} with numbers, a non-empty list of scalars, or one
    scalar."""
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, list):
        if not spec or not all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
            raise ConfigError(f"{where} key '{key}': expected a non-empty list of plain values (numbers, text, true)")
        return spec
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log"}:
        raise ConfigError(f"{where} key '{key}': expected {{low: L, high: H, log: true|false}} or [choice, ...]")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high or not isinstance(log, bool) or (log and low <= 0):
        raise ConfigError(f"{where} key '{key}': expected numbers low < high (low > 0 with log: true)")
    return {"low": low, "high": high, "log": log}


def check_space(cfg: Config, space: Space, where: str = "the search space") -> Space:
    """`space` checked against `cfg`: each key a config key that takes the space's values (its low and high, each
    choice, or the one value), else a ConfigError naming the key."""
    checked = {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: expected a mapping of config keys to {{low, high, log}} or [choices]")
    base = dict(_flat(cfg))
    for key, spec in space.items():
        checked[key] = _check_entry(str(key), spec, where)
        spec = checked[key]
        values = spec if isinstance(spec, list) else [spec["low"], spec["high"]] if isinstance(spec, dict) else [spec]
        for value in values:
            try:
                load_config(None, base | {key: value})
            except ConfigError as err:
                raise ConfigError(f"{where} key '{key}' = {value!r}: {err}") from None
    return checked


def _flat(cfg: Config) -> list[tuple[str, Any]]:
    return dotted_items(to_dict(cfg))


def read_space(path: Path, cfg: Config) -> Space:
    """A `--space` YAML file, checked against `cfg`."""
    where = f"--space '{path}'"
    try:
        loaded = read_yaml(Path(path).read_text(encoding="utf-8"), where)
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return check_space(cfg, loaded, where)


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """One trial's values of the space (dotted key -> value), drawn by Optuna's `trial`."""
    params = {}
    for key, spec in space.items():
        if not isinstance(spec, (list, dict)):
            params[key] = spec  # set, not searched
        elif isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"])
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec["log"])
    return params


def trial_config(cfg: Config, params: dict[str, Any], output_dir: Path, read_test: bool = False) -> Config:
    """`cfg` with a trial's values, its own run folder, no live progress bar (the child writes to a log file) and,
    during the search, a test split that is never read."""
    extra = {"output_dir": str(output_dir), "logging.progress_bar": False, "data.read_test": read_test}
    return load_config(None, dict(_flat(cfg)) | params | extra)
