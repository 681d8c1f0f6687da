"""`fulltune train`: fine-tune from a YAML config plus flags and `key=value` overrides; `--nproc N` runs N
data-parallel processes on this node through torchrun."""

from __future__ import annotations

import argparse
from typing import Any

from fulltune.cli.flags import add_config_flags, config_from_args
from fulltune.cli.options import require_training_data


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model from a YAML config plus overrides")
    add_config_flags(p)
    p.add_argument("--resume", help="'auto' (newest checkpoint in output_dir), a run folder, or a checkpoint folder")
    p.add_argument("--nproc", type=int, help="run N data-parallel processes on this node (torchrun shortcut)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in output_dir (its checkpoints too)"
    )
    p.set_defaults(func=run)


def _without_nproc(argv: list[str]) -> list[str]:
    if "--nproc" in argv:
        i = argv.index("--nproc")
        return argv[:i] + argv[i + 2 :]
    return [a for a in argv if not a.startswith("--nproc=")]


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate here, before any process or folder is started
    require_training_data(cfg)
    if args.nproc and args.nproc > 0:
        from fulltune.runtime.distributed import launch

        return launch(args.nproc, _without_nproc(list(args.argv)))
    from fulltune.training.trainer import train

    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
