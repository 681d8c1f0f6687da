"""Making every option discoverable: `--help` with defaults on every command, `--version`, kebab-case flags beside
snake_case ones, config keys typed as flags (`--learning_rate 1e-5`, HF Trainer style), and `fulltune config` (its
`register`/`run`), which prints the merged config as YAML with each key's default and the one-line description
from config.py.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from fulltune.config import ALIASES, Config, to_dict
from fulltune.config.describe import describe_keys
from fulltune.config.names import CLIP_LAYOUT, HF_TRAINER_ELSEWHERE, PRECISION_SWITCHES, layout_key
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


BOOLEAN_WORDS = {
    "true": "true",
    "yes": "true",
    "on": "true",
    "1": "true",
    "false": "false",
    "no": "false",
    "off": "false",
    "0": "false",
}
"""What a switch flag (`--bf16`, `--training.compile`) reads as its value; any other next word is not its value."""


class ConfigFlags:
    """The config keys a command line may type as flags: fulltune's dotted keys, every alias (config/names.py), and
    a key's last part where only one key ends so (`--num_epochs`, `--text_column`)."""

    def __init__(self) -> None:
        self.described = describe_keys()
        layout = {k for k, target in CLIP_LAYOUT.items() if target in self.described}  # not its sections alone
        self.names = set(self.described) | set(ALIASES) | layout
        leaves: dict[str, list[str]] = {}
        for key in self.described:
            leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
        self.leaves = leaves

    def key(self, name: str) -> str | None:
        """The key (or alias) the flag `--name` sets; None when it names none; an error when it names several."""
        if name in self.names or layout_key(name) in self.described:  # layerwise_lr.enabled: CLIP_LAYOUT
            return name
        if name in HF_TRAINER_ELSEWHERE:
            raise ConfigError(
                f"--{name} (a Hugging Face Trainer argument) has no fulltune key: {HF_TRAINER_ELSEWHERE[name]}"
            )
        found = self.leaves.get(name, [])
        if len(found) > 1:
            raise ConfigError(f"--{name} is ambiguous: say which, e.g. " + " or ".join(f"--{k}" for k in found))
        return found[0] if found else None

    @staticmethod
    def target(key: str) -> str:
        """The fulltune key an alias (or a key of CLIP_LAYOUT) sets."""
        return ALIASES.get(layout_key(key), layout_key(key))

    def is_switch(self, key: str) -> bool:
        """Whether the key is a boolean (a bare `--key` means true)."""
        leaf = key.rsplit(".", 1)[-1]
        return leaf in PRECISION_SWITCHES or isinstance(self.described.get(self.target(key), (None,))[0], bool)

    def spellings(self) -> list[str]:
        """Every way to type a config key as a flag (for did-you-mean)."""
        return sorted(self.names | {leaf for leaf, keys in self.leaves.items() if len(keys) == 1})


def _unknown_flag(flag: str, command: str, options: set[str], config: ConfigFlags | None) -> ConfigError:
    """One line: the flag is unknown to the command, with the closest flags or config keys (difflib), one spelling
    per key."""
    name = flag[2:].replace("-", "_")
    targets = {o[2:]: o[2:] for o in options if o.startswith("--")}  # spelling -> what it sets
    if config is not None:
        for spelled in config.spellings():
            targets.setdefault(spelled, config.target(config.key(spelled) or spelled))
    shown: dict[str, str] = {}
    for close in difflib.get_close_matches(name, list(targets), n=10, cutoff=0.6):
        target = targets[close]
        shown.setdefault(target, f"--{close}" + (f" (sets {target})" if target != close else ""))
    hint = "; did you mean " + " or ".join(list(shown.values())[:3]) + "?" if shown else ""
    listed = " (`fulltune config` lists the config keys)" if config is not None else ""
    return ConfigError(f"unknown flag {flag} for `fulltune {command}`{hint}{listed}")


def _takes_value(action: argparse.Action) -> int:
    """How many words after the flag are its value (0 for switches; -1: argparse decides, e.g. nargs='*')."""
    if action.nargs is None:
        return 1
    if isinstance(action.nargs, int):
        return action.nargs
    return -1


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--output-dir` -> `--output_dir`; a config key or alias typed as a flag (`--learning_rate 1e-5`,
    `--training.num_epochs=2`, a bare `--bf16`) becomes the override `learning_rate=1e-5` when the command takes
    overrides, and every override goes last (argparse reads one run of positionals only), so flags and
    `key=value` mix in any order. An unknown flag is a ConfigError with the closest names."""
    commands = _subparsers(parser)
    command = next((a for a in argv if not a.startswith("-")), "")
    sub = commands.get(command)
    actions = {s: a for p in (parser, sub) if p is not None for a in p._actions for s in a.option_strings}
    takes_overrides = sub is not None and any(a.dest == "overrides" for a in sub._actions)
    config: ConfigFlags | None = None  # read from config/sections.py when a flag is not the command's own
    out: list[str] = []
    overrides: list[str] = []
    seen_command = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":  # what follows is positional
            if takes_overrides:
                overrides.extend(argv[i:])
            else:
                out.extend(argv[i - 1 :])
            break
        if not arg.startswith("--") or len(arg) == 2:
            if takes_overrides and seen_command:
                overrides.append(arg)
            else:
                out.append(arg)
                seen_command = seen_command or arg == command
            continue
        name, eq, value = arg[2:].partition("=")
        snake = "--" + name.replace("-", "_")
        action = actions.get(snake) or actions.get(arg.partition("=")[0])
        key = None
        if action is None and takes_overrides:
            config = config or ConfigFlags()
            key = config.key(name.replace("-", "_"))
        if action is None and key is None and sub is not None:
            prefixed = [o for o in actions if o.startswith(snake)]  # argparse's abbreviations (--out for --output_dir)
            if len(prefixed) != 1:
                raise _unknown_flag(arg.partition("=")[0], command, set(actions), config)
            snake, action = prefixed[0], actions[prefixed[0]]
        if action is not None or key is None:  # the command's own flag (or, before the command, argparse's to judge)
            out.append(snake + eq + value)
            count = _takes_value(action) if action is not None and not eq else 0
            out.extend(argv[i : i + max(count, 0)])
            i += max(count, 0)
            continue
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if config is not None and config.is_switch(key):
                word = BOOLEAN_WORDS.get((nxt or "").lower())  # `--bf16 false`; a bare `--bf16` is true
                value = word or "true"
                if word is not None:
                    i += 1
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"--{name}: expected a value, e.g. --{name} VALUE or {key}=VALUE")
            else:
                value = nxt
                i += 1
        overrides.append(f"{key}={value}")
    return out + overrides


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
