"""A run folder as a whole: atomic folder writes with fsync (a kill at any instant leaves the old or the new folder
whole), recovery of what an interrupted save left behind, and one run per folder (`claim_output_dir`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fulltune.errors import ConfigError
from fulltune.safestate import fsync_file


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` by renames.

    Everything in the temporary folder is fsynced before the first rename. A kill between the two renames leaves
    `.NAME.old-PID` and no `NAME`: `recover_run_dir` (run at every start) renames it back, so a kill at any
    instant leaves the old or the new folder whole.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _kill_point("before-rename")
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        _kill_point("between-renames")
    tmp.rename(final)
    fsync_dir(final.parent)
    _kill_point("after-rename")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _kill_point(name: str) -> None:
    """Test hook: FULLTUNE_KILL_AT=NAME:N kills this process with SIGKILL the N-th time it passes `name`."""
    spec = os.environ.get("FULLTUNE_KILL_AT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _KILL_COUNTS[name] = _KILL_COUNTS.get(name, 0) + 1
    if _KILL_COUNTS[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_KILL_COUNTS: dict[str, int] = {}


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform without directory handles (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files first), so a rename never publishes unwritten data."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_run_dir(output_dir: Path, log: Any = print) -> list[str]:
    """Finish what a killed save left: a `.NAME.old-PID` whose `NAME` is missing is renamed back (the kill came
    between the two renames); every other temporary folder is removed. Returns the actions, each also logged."""
    out = Path(output_dir)
    actions: list[str] = []
    if not out.is_dir():
        return actions
    for entry in sorted(out.iterdir()):
        m = _STALE.match(entry.name)
        if m is None or not entry.is_dir() or _alive(int(m["pid"])):
            continue
        final = out / m["name"]
        if m["kind"] == "old" and not final.exists():
            entry.rename(final)
            fsync_dir(out)
            actions.append(f"restored {final} from {entry.name} (a save was interrupted between its renames)")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry} (left by an interrupted save)")
    for action in actions:
        log(action)
    return actions


RUN_FILES = ("summary.json", "metrics.jsonl", "train.log", "labels.json", "config.yaml", "best", "tensorboard")
"""What `train` writes into a run folder (besides checkpoint-*): the files that make a folder another run's."""


def _run_files(out: Path) -> list[Path]:
    found = [p for p in sorted(out.glob("checkpoint-*")) if p.is_dir()]
    return found + [out / n for n in RUN_FILES if (out / n).exists() and n != "config.yaml"]


def claim_output_dir(output_dir: Path, resume: str | None, overwrite: bool = False, log: Any = print) -> None:
    """Make `output_dir` this run's own, before anything is written: clean what a killed save left (logged); a
    fresh run into a folder that holds another run's checkpoints, best/, metrics or summary is an error naming the
    choices, unless `overwrite`, which removes those files (and only those: fulltune's own)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file, not a folder")
    main = int(os.environ.get("RANK", "0")) == 0
    if not out.is_dir():
        return
    if main:
        recover_run_dir(out, log)
    if resume is not None:
        return
    others = _run_files(out)
    if not others:
        return
    if not overwrite:
        names = ", ".join(p.name for p in others[:4]) + (", ..." if len(others) > 4 else "")
        raise ConfigError(
            f"output_dir '{out}' holds another run ({names}): continue it with --resume auto, choose a new "
            "--output_dir, or pass --overwrite to delete that run's files"
        )
    if main:
        for p in others + [out / "config.yaml"]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        log(f"--overwrite: removed the previous run's files from {out}")
