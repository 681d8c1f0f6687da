"""`fulltune demo` (what `make demo` runs): MiniLM fully fine-tuned on the standard library's docstrings."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="the embedded default: MiniLM fully fine-tuned on stdlib docstrings")
    p.add_argument("--output_dir", default="outputs/demo", help="folder for the data, the run and the test report")
    p.add_argument("--data_only", action="store_true", help="only build the docstring data set in OUTPUT_DIR/data")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo's config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.demo import build_demo_data, run_demo

    if args.data_only:
        build_demo_data(args.output_dir)
        return 0
    run_demo(args.output_dir, extra_overrides=args.overrides)
    return 0
