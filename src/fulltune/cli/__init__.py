"""`fulltune` command line: one module per command, each with `register(subparsers)` and `run(args)`; this module
builds the parser and dispatches.

Every failure a user can cause (bad config, data, checkpoint, or environment: permissions, a full disk, a path that
is a file) ends in one line `fulltune: error: ...` and a non-zero exit: 2 for a bad config or checkpoint
(ConfigError), 1 for data, training and environment errors, 130 for Ctrl-C and 143 for SIGTERM (a training run
saves a checkpoint first). A traceback only for bugs, or for anything with `--debug` / FULLTUNE_DEBUG=1.

Parsing loads no torch or transformers (`--version`, `--help`, `config` and argument errors take well under a
second): each command module imports what its `run` needs when it runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import typing
import warnings
from typing import Any

from fulltune.cli import (
    compare,
    demo,
    evaluate,
    export,
    interpolate,
    plan,
    predict,
    prepare_images,
    prune,
    report,
    train,
    tune,
)
from fulltune.cli import config as config_command
from fulltune.cli.options import finish_parser, normalize_argv
from fulltune.errors import ConfigError, FulltuneError, as_os_error
from fulltune.speed.threads import prepare_openmp

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
prepare_openmp()  # OpenMP's wait settings, before any command imports torch (the Python API imports this module too)


class _ImportNoise(logging.Filter):
    """Lines logged while libraries are imported that tell a fulltune user nothing: torchao's compiled kernel
    libraries for GPU formats fulltune does not use (fp8, CUTLASS) that cannot load on this machine, and torch's
    notice that torchao registers an enum the old way. transformers imports torchao wherever it is installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load ") and ".so" in msg) and "now natively supported" not in msg


logging.getLogger("torchao").addFilter(_ImportNoise())
logging.getLogger("torch.utils._pytree").addFilter(_ImportNoise())

COMMANDS = (
    train,
    evaluate,
    predict,
    prepare_images,
    demo,
    compare,
    tune,
    plan,
    prune,
    report,
    config_command,
    interpolate,
    export,
)


LIGHT_COMMANDS = {"config"}
"""Commands that load no model: transformers is not imported for them."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line `fulltune: error: ...` that points at --help (exit status 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"fulltune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fulltune", description="Full fine-tuning of pretrained transformers, and its rivals.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return finish_parser(parser)  # --version, defaults in every --help


# OS errors that the user's environment causes (and can fix), not fulltune's code.
USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
}


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take `--debug` out of argv wherever it stands (before or after the command); FULLTUNE_DEBUG=1 also counts."""
    debug = "--debug" in argv or os.environ.get("FULLTUNE_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def user_error(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) when `err` is a failure the user caused; None for a bug (which keeps its traceback)."""
    if isinstance(err, FulltuneError):
        return str(err), err.exit_code
    err = as_os_error(err) or err  # the OS error safetensors' writer wraps (a full disk, a read-only folder)
    if isinstance(err, OSError) and err.errno in USER_ERRNOS:
        what = err.strerror or USER_ERRNOS[err.errno]
        paths = [p for p in (err.filename, err.filename2) if p is not None]
        where = ": " + " -> ".join(f"'{os.fsdecode(p)}'" for p in paths) if paths else ""
        return f"{what}{where}", 1
    if isinstance(err, MemoryError):
        return "out of memory (reduce data.batch_size, or try training.memory=lean)", 1
    return None


def run_command(func: Any, args: Any, debug: bool = False) -> int:
    """Run one command; turn a user-caused failure into one `fulltune: error:` line on stderr."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, or `Interrupted` (SIGINT / SIGTERM) saying what it saved
        said = str(err) or "interrupted"
        hint = "; resume with --resume auto" if getattr(err, "resumable", True) else ""
        print(f"fulltune: {said}{hint}", file=sys.stderr, flush=True)
        return int(getattr(err, "exit_code", 130))
    except Exception as err:
        known = user_error(err)
        if known is None or debug:
            raise
        from fulltune.runtime.ranks import rank, world_size

        message, code = known
        where = f"[rank {rank()}] " if world_size() > 1 else ""
        line = " ".join(f"{where}{message}".split("\n"))  # one line, whatever the message holds
        print(f"fulltune: error: {line}", file=sys.stderr, flush=True)
        return code


def quiet_libraries() -> None:
    """Our own progress bar and log lines say what happens; transformers' per-shard bars only add noise (datasets'
    bars are turned off where fulltune loads datasets, data/hf_datasets.py)."""
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import transformers

    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        argv = normalize_argv(argv, parser)  # --output-dir, --learning_rate 1e-5, bare --bf16, key=value anywhere
    except ConfigError as err:
        print(f"fulltune: error: {err}", file=sys.stderr)
        return err.exit_code
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command not in LIGHT_COMMANDS:
        quiet_libraries()
    return run_command(args.func, args, debug)


if __name__ == "__main__":
    raise SystemExit(main())
