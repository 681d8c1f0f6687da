"""`fulltune config`: the merged config as YAML, each key with its default and its one-line description."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fulltune.cli.flags import add_config_flags, config_from_args
from fulltune.cli.options import HelpFormatter, render_config


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the merged config as YAML, with each key's default and description",
        description="Every key `train` accepts, with its value after --config and overrides, its default and what "
        "it does. Save the output as a starting config: fulltune config > my.yaml",
        formatter_class=HelpFormatter,
    )
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(render_config(config_from_args(args)))
    return 0
