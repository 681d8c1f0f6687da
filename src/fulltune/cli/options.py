"""Making every option discoverable: `--help` with defaults on every command, `--version`, kebab-case flags beside
snake_case ones, config keys typed as flags (`--learning_rate 1e-5`, HF Trainer style), and `fulltune config` (its
`register`/`run`), which prints the merged config as YAML with each key's default and the one-line description
from config.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from fulltune.config import ALIASES, Config, to_dict
from fulltune.config.describe import describe_keys
from fulltune.errors import ConfigError, DataError

# Help for flags that were registered without any: every flag says what it does.
FLAG_HELP = {
    "checkpoint": "an exported folder: a run's best/ or checkpoint-*/",
    "data_dir": "data folder (image: <split>/<class>/ folders; text: train/val/test tables)",
    "batch_size": "examples per forward pass",
    "device": "auto (CUDA when present), cuda, cuda:N or cpu",
    "output_dir": "where the results go",
    "split": "split to evaluate: dev, val, validation, test or train",
    "top_k": "how many labels to show per input",
    "max_new_tokens": "causal LM: tokens to generate",
    "top_p": "causal LM: nucleus sampling threshold (with --temperature > 0)",
    "seed": "seed of the shuffle",
    "overrides": "dotted key=value config overrides, e.g. training.base_learning_rate=1e-5",
    "evaluate.output_dir": "where the results go (default: <run>/eval/<checkpoint name>-<split or file stem>)",
    "prepare-images.output_dir": "the data folder to create (train/ val/ test/ inside)",
    "demo.output_dir": "where the data set and the run go",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (None and False defaults are left out: they mean 'not set')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or action.default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--version, defaults in every --help, and a help text for every flag (call once the commands are added)."""
    from fulltune import __version__

    parser.add_argument("--version", action="version", version=f"fulltune {__version__}")
    for name, p in [("", parser), *_subparsers(parser).items()]:
        p.formatter_class = HelpFormatter
        for action in p._actions:
            text = FLAG_HELP.get(f"{name}.{action.dest}") or FLAG_HELP.get(action.dest)
            if not action.help and text:
                action.help = text
            elif not action.help and action.option_strings:
                action.help = action.dest.replace("_", " ")
    return parser


def _config_keys() -> set[str]:
    return set(describe_keys())


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--output-dir` -> `--output_dir`; a config key typed as a flag (`--learning_rate 1e-5`,
    `--training.num_epochs=2`) becomes the override `learning_rate=1e-5` when the command takes overrides."""
    commands = _subparsers(parser)
    sub = commands.get(next((a for a in argv if not a.startswith("-")), ""), None)
    known = {s for p in (parser, sub) if p is not None for a in p._actions for s in a.option_strings}
    takes_overrides = sub is not None and any(a.dest == "overrides" for a in sub._actions)
    keys = _config_keys() | set(ALIASES)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            snake = "--" + name.replace("-", "_")
            if snake in known:
                out.append(snake + eq + value)
            elif takes_overrides and name.replace("-", "_") in keys:
                key = name.replace("-", "_")
                if not eq:
                    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                        raise ConfigError(f"--{name}: expected a value, e.g. --{name} VALUE or {key}=VALUE")
                    i += 1
                    value = argv[i]
                out.append(f"{key}={value}")
            else:
                out.append(arg)
        else:
            out.append(arg)
        i += 1
    return out


# ---------------------------------------------------------------- the config's keys, defaults and descriptions


def render_config(cfg: Config) -> str:
    """The config as YAML, each key followed by `# default: X. description` (when its value is the default, only
    the description)."""
    described = describe_keys()
    values = to_dict(cfg)
    lines: list[str] = []

    def walk(tree: dict[str, Any], prefix: str, indent: int) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            pad = "  " * indent
            if dotted not in described and isinstance(value, dict):
                lines.append(f"{pad}{key}:")
                walk(value, dotted + ".", indent + 1)
                continue
            default, doc = described.get(dotted, (None, ""))
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000, sort_keys=False).strip()
            text = text[1:-1] if text.startswith("{") else text
            note = doc if value == default else f"default: {json.dumps(default)}. {doc}"
            lines.append(f"{pad}{text}" + (f"  # {note}" if note else ""))

    walk(values, "", 0)
    return "\n".join(lines) + "\n"


def require_training_data(cfg: Config) -> None:
    """`train` without any data is a one-line error, before anything (an output folder) is created."""
    d = cfg.data
    if not (d.data_dir or d.train_file or d.dataset_name):
        raise ConfigError(
            "no training data: give --data_dir DIR or --train_file FILE (or data.data_dir / "
            "data.train_file in the --config file); `fulltune config` lists every key"
        )
    if d.data_dir and not Path(d.data_dir).is_dir():
        raise DataError(f"data.data_dir '{d.data_dir}' does not exist")
