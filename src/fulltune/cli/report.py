"""`fulltune report RUN_DIR`: (re)build a run folder's report.html and curves.png."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fulltune.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="(re)build a run folder's report.html and curves.png")
    p.add_argument("run_dir", help="a run folder (the output_dir of `fulltune train`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.files.rundir import owner_of
    from fulltune.report.html import build_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "summary.json").is_file():
        raise ConfigError(f"'{run_dir}' is not a fulltune run folder (no metrics.jsonl or summary.json in it)")
    if owner_of(run_dir) != "train":  # report.html, curves.png and report/ are what `train` writes there
        raise ConfigError(f"'{run_dir}' holds the output of `fulltune {owner_of(run_dir)}`, not a training run")
    path = build_report(run_dir)
    print(f"written: {path}, {run_dir / 'curves.png'}")
    return 0
