"""The one table of command-line flags that stand for config keys, shared by every command that reads a config
(`train`, `compare`, `plan`, `prune`), and the helpers that register them and turn them into overrides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

# flag -> config key it sets
CONFIG_FLAGS: dict[str, str] = {
    "data_dir": "data.data_dir",
    "output_dir": "output_dir",
    "train_file": "data.train_file",
    "val_file": "data.val_file",
    "test_file": "data.test_file",
    "model": "model.name_or_path",
    "task": "task",
    "method": "method.name",
}
FLAG_HELP: dict[str, str] = {
    "data_dir": "data folder: class folders for images, train/val/test tables for text, train.txt for LMs",
    "output_dir": "run folder",
    "train_file": "the training table or text file",
    "val_file": "the validation table or text file",
    "test_file": "the test table or text file",
    "model": "hub id, local model folder, or 'minilm' (the packaged all-MiniLM-L6-v2)",
    "task": "image_classification, text_classification, text_regression, multi_label_classification, "
    "token_classification, causal_lm, or auto",
    "method": "full, partial, linear_probe or lora",
}


def add_config_flags(
    parser: argparse.ArgumentParser, flags: Iterable[str] = CONFIG_FLAGS, config: bool = True, overrides: bool = True
) -> None:
    """`--config FILE`, the given flags of CONFIG_FLAGS, and the trailing dotted `key=value` overrides."""
    if config:
        parser.add_argument("--config", help="YAML config file")
    for flag in flags:
        parser.add_argument(f"--{flag}", help=f"{FLAG_HELP[flag]} (sets {CONFIG_FLAGS[flag]})")
    if overrides:
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.base_learning_rate=1e-5")


def flag_overrides(args: argparse.Namespace, flags: Iterable[str] = CONFIG_FLAGS) -> list[str]:
    """`key=value` overrides for the given flags that were set on the command line (JSON-quoted values)."""
    return [
        f"{CONFIG_FLAGS[flag]}={json.dumps(getattr(args, flag))}"
        for flag in flags
        if getattr(args, flag, None) is not None
    ]


def config_from_args(
    args: argparse.Namespace, flags: Iterable[str] = CONFIG_FLAGS, extra: list[str] | None = None
) -> Any:
    """The validated config: --config, then the flags, then key=value overrides (which win), then `extra`."""
    from fulltune.config import load_config

    return load_config(args.config, flag_overrides(args, flags) + list(args.overrides or []) + list(extra or []))
