"""`fulltune` command line: one module per command, each with `register(subparsers)` and `run(args)`; this module
builds the parser and dispatches.

Every expected failure (bad config, bad data, a NaN loss) ends in one line `fulltune: error: ...` and a non-zero
exit status; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from fulltune.cli import compare, demo, evaluate, plan, predict, prepare_images, prune, train

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMANDS = (train, evaluate, predict, prepare_images, demo, compare, plan, prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fulltune",
                                     description="Full fine-tuning of pretrained transformers, and its rivals.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fulltune.errors import ConfigError, FulltuneError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import transformers

    # Our own progress bar and log lines say what happens; transformers' per-shard bars only add noise.
    transformers.utils.logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except FulltuneError as err:
        from fulltune.runtime import rank, world_size

        where = f"[rank {rank()}] " if world_size() > 1 else ""
        print(f"fulltune: error: {where}{err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print("fulltune: interrupted; resume with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
