"""Output folders as a whole: atomic folder writes with fsync (a kill at any instant leaves the old or the new folder
whole), recovery of what an interrupted save left behind, and the one rule every writing command follows
(`claim_output`): it writes only into a new or empty folder, or into a folder holding its own earlier output,
recognised by the record it left there (`fulltune_output.json`), and never into, inside or above its own inputs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulltune.errors import ConfigError, as_os_error
from fulltune.files.safestate import fsync_file


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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = as_os_error(err, final)  # a full disk inside safetensors' writer names the folder being written
        if full is not None:
            raise full from None
        raise
    kill_point("before-rename")
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        kill_point("between-renames")
    tmp.rename(final)
    fsync_dir(final.parent)
    kill_point("after-rename")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace the file `path` whole: written beside as `.NAME.tmp-PID`, fsynced, renamed over it, so a kill at any
    instant leaves the old file or the new one, never a truncated one that a later run would trust
    (`recover_run_dir` removes the temporary a kill left)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    fsync_file(tmp)
    kill_point(f"{path.stem}-written")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def kill_point(name: str) -> None:
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


def recover_run_dir(output_dir: Path, log: Any = print, only: str | None = None) -> list[str]:
    """Finish what a killed save left: a `.NAME.old-PID` whose `NAME` is missing is renamed back (the kill came
    between the two renames); every other temporary folder or file is removed (`only`: those of that one NAME).
    Returns the actions, each also logged."""
    out = Path(output_dir)
    actions: list[str] = []
    if not out.is_dir():
        return actions
    for entry in sorted(out.iterdir()):
        m = _STALE.match(entry.name)
        if m is None or entry.is_symlink() or _alive(int(m["pid"])) or only not in (None, m["name"]):
            continue
        final = out / m["name"]
        if m["kind"] == "old" and not final.exists():
            entry.rename(final)
            fsync_dir(out)
            actions.append(f"restored {final} from {entry.name} (a save was interrupted between its renames)")
        else:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            actions.append(f"removed {entry} (left by an interrupted save)")
    for action in actions:
        log(action)
    return actions


OUTPUT_RECORD = "fulltune_output.json"
"""Written by every command at the top of the folder it owns: which command, and which entries it writes."""

TRAIN_ENTRIES = (
    "config.yaml",
    "labels.json",
    "train.log",
    "metrics.jsonl",
    "run_history.jsonl",
    "summary.json",
    "report.html",
    ".report.html.tmp",
    "curves.png",
    "report",
    "tensorboard",
    "mlruns",
    "wandb",
    "cache",
    "eval",
    "best",
    "checkpoint-*",
    "compare.log",
)
"""What `train` writes into a run folder (compare.log: the output of the `compare` process that started it)."""

_TRAIN_RUN_FILES = ("summary.json", "metrics.jsonl", "train.log", "labels.json", "best", "tensorboard", "checkpoint-*")
"""What shows that a run took place in a folder (its config, data cache or evaluations alone do not)."""


@dataclass
class OutputFolder:
    """The outcome of `claim_output`: the folder, the command that owns it, and what an earlier run left."""

    path: Path
    command: str
    previous: list[str]
    """Top-level entries an earlier run of the same command wrote (empty for a new or empty folder)."""

    def remove_previous(self, log: Any = print) -> None:
        """Delete what the earlier run of this command wrote, and nothing else. Each entry is first renamed to a
        temporary name, so a kill midway leaves no half-deleted folder under a name fulltune reads."""
        for name in self.previous:
            entry = self.path / name
            doomed = self.path / f".{name}.del-{os.getpid()}"
            entry.rename(doomed)
            fsync_dir(self.path)
            if doomed.is_dir() and not doomed.is_symlink():
                shutil.rmtree(doomed)
            else:
                doomed.unlink()
        if self.previous:
            log(f"--overwrite: removed what the earlier `fulltune {self.command}` wrote in {self.path}")
        self.previous = []


def _is_temporary(name: str) -> bool:
    """Names fulltune gives to folders and files being written or deleted (`.NAME.tmp-PID` and the like), and the
    run folder's lock file."""
    return bool(_STALE.match(name)) or (name.startswith(".") and ".shards.tmp-" in name) or name == LOCK_FILE


def read_record(folder: Path) -> dict[str, Any] | None:
    """The output record of `folder` (None where there is none, or where it is not one fulltune wrote)."""
    path = Path(folder) / OUTPUT_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("command"), str):
        return None
    entries = record.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return None
    return record


def owner_of(folder: Path) -> str | None:
    """The command whose output `folder` holds: from its record, or `train` for a run of an older fulltune."""
    record = read_record(folder)
    if record is not None:
        return record["command"]
    # No record: a run of an older fulltune, or a folder only train has written to so far (its data cache).
    names = [p.name for p in Path(folder).iterdir() if not _is_temporary(p.name)] if Path(folder).is_dir() else []
    if names and all(_owned(n, TRAIN_ENTRIES) for n in names):
        return "train"
    return None


def _owned(name: str, patterns: Iterable[str]) -> bool:
    return name == OUTPUT_RECORD or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _describe(folder: Path, names: list[str]) -> str:
    """What a folder fulltune will not write into holds, in a user's words."""
    runs = [n for n in names if (folder / n).is_dir() and owner_of(folder / n)]
    rest = [n for n in names if n not in runs]
    parts = []
    if runs:
        parts.append(f"{len(runs)} fulltune output folder{'s' if len(runs) > 1 else ''} ({_listing(runs)})")
    if rest:
        parts.append(f"files fulltune did not write ({_listing(rest)})")
    return " and ".join(parts)


def check_inputs(out: Path, inputs: Iterable[Any], flag: str = "--output_dir") -> None:
    """An output folder equal to, inside or above one of the command's inputs is refused (with or without
    --overwrite): writing there could replace or delete what the command reads."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        src = Path(str(given)).expanduser()
        if not src.exists():
            continue  # a hub id, or nothing on disk that writing could harm
        src = src.resolve()
        where = "is" if target == src else "lies inside" if src in target.parents else "contains"
        if target == src or src in target.parents or target in src.parents:
            raise ConfigError(f"{flag} '{out}' {where} the input '{given}': choose an output folder outside the inputs")


def claim_output(
    out: Path,
    command: str,
    inputs: Iterable[Any] = (),
    entries: Iterable[str] = (),
    flag: str = "--output_dir",
    write_record: bool = True,
) -> OutputFolder:
    """The one rule of every command that writes a folder: `out` must be new, empty, or hold this command's own
    earlier output (its record names the command); it must not be, lie inside or contain an input. Anything
    else is a ConfigError naming the folder, what it holds and what to do. `entries`: the top-level names or
    patterns the command writes into a shared folder (its record lists them; files beside them are left alone);
    none for a command whose output is the whole folder (written by `atomic_output`), which refuses an earlier
    output with files it did not write. Leftovers of a killed write beside or inside `out` are cleaned first."""
    out = Path(out)
    entries = tuple(entries)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} '{out}' is a file, not a folder")
    check_inputs(out, inputs, flag)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        recover_beside(out)
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if main and present:
        recover_run_dir(out)
        present = sorted(p.name for p in out.iterdir())
    present = [n for n in present if not _is_temporary(n)]
    claim = OutputFolder(out, command, [])
    if present:
        owner = owner_of(out)
        if owner != command:
            what = f"the output of `fulltune {owner}`" if owner else _describe(out, present)
            raise ConfigError(
                f"{flag} '{out}' holds {what}: fulltune {command} writes only into a new or empty folder, or "
                f"into its own earlier output; choose another {flag}"
            )
        record = read_record(out)
        mine = tuple(record["entries"]) if record else TRAIN_ENTRIES
        foreign = [n for n in present if not _owned(n, mine)]
        if foreign and not entries:
            raise ConfigError(
                f"{flag} '{out}' holds the earlier output of `fulltune {command}` and files it did not write "
                f"({_listing(foreign)}): move them out, or choose another {flag}"
            )
        claim.previous = [n for n in present if n != OUTPUT_RECORD and _owned(n, mine)]
    if entries and write_record and main:
        out.mkdir(parents=True, exist_ok=True)
        _write_record(out, command, entries)
    return claim


def _write_record(folder: Path, command: str, entries: Iterable[str], files: list[str] | None = None) -> None:
    record: dict[str, Any] = {"format": 1, "command": command, "entries": sorted(set(entries))}
    if files is not None:
        record["files"] = files
    if read_record(folder) == record:
        return  # a resume or rerun leaves the folder as it found it
    tmp = folder / f".{OUTPUT_RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, folder / OUTPUT_RECORD)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_output(out: Path, command: str) -> Iterator[Path]:
    """Write a whole-folder output (an export, an evaluation, a split image set): yield a temporary folder beside
    `out`; on success its record lists every file and it replaces `out` by renames (see `atomic_dir`), so a kill
    at any instant leaves the old output or the new one. Call `claim_output(out, command, ...)` first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        _write_record(tmp, command, sorted({f.split("/")[0] for f in files}), files)


def recover_beside(out: Path) -> list[str]:
    """Leftovers of an interrupted `atomic_dir(out)` beside `out` (`.NAME.tmp-PID`, `.NAME.old-PID` of a process
    that is gone): the old folder goes back when `out` is missing, the rest is removed. Only `out`'s own."""
    return recover_run_dir(Path(out).parent, only=Path(out).name)


@dataclass
class RunClaim:
    """What `claim_output_dir` found: `abandon_run_dir` removes what the run added when it fails before it starts."""

    path: Path
    created: list[Path]
    """The folders that did not exist before the claim (`path` and missing parents), outermost first."""
    before: set[str]
    """The names in `path` before the claim."""


def claim_output_dir(
    output_dir: Path,
    resume: str | None,
    overwrite: bool = False,
    log: Any = print,
    inputs: Iterable[Any] = (),
) -> RunClaim:
    """Make `output_dir` this training run's own, before anything is written (`claim_output` with train's
    entries), and hold its lock for the run (`release_run_lock` at the end; the OS releases it when the process
    dies): a second process is refused. A fresh run into a folder that holds an earlier run is an error naming
    the choices, unless `overwrite`, which removes what that run wrote (and only that)."""
    out = Path(output_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    run = RunClaim(out, [p for p in reversed([out, *out.parents]) if not p.exists()], set())
    claim = claim_output(output_dir, "train", inputs, TRAIN_ENTRIES, write_record=False)
    run.before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if main:  # after the checks, which write nothing: a refused folder gets no lock file
        _lock_run(out)
    earlier = [n for n in claim.previous if _owned(n, _TRAIN_RUN_FILES) and n != OUTPUT_RECORD]
    if resume is None and earlier:
        if not overwrite:
            abandon_run_dir(run)  # the lock file this claim added goes again
            raise ConfigError(
                f"output_dir '{output_dir}' holds another run ({_listing(earlier)}): continue it with --resume "
                "auto, choose a new --output_dir, or pass --overwrite to delete that run's files"
            )
        if main:
            claim.remove_previous(log)
            run.before = {p.name for p in out.iterdir()}
    out.mkdir(parents=True, exist_ok=True)
    if main:
        _write_record(out, "train", TRAIN_ENTRIES)
    return run


def abandon_run_dir(run: RunClaim) -> None:
    """After a run that failed before training started (a bad column, an unknown model): remove what it added to
    its folder (the record, the lock, a data cache) and the folders its claim created, so that nothing is left
    that was not there before. Only names `train` writes go, and a folder only when nothing else is left in it;
    a run that got as far as its log (train.log, checkpoints, metrics) is kept whole."""
    release_run_lock(run.path)
    if int(os.environ.get("RANK", "0")) != 0 or not run.path.is_dir():
        return
    added = [p for p in run.path.iterdir() if p.name not in run.before]
    if any(_owned(p.name, _TRAIN_RUN_FILES) and p.name != OUTPUT_RECORD for p in added):
        return
    for entry in added:
        if not (_owned(entry.name, TRAIN_ENTRIES) or _is_temporary(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    for folder in reversed(run.created):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return


LOCK_FILE = ".fulltune.lock"
_LOCKS: dict[Path, int] = {}
"""Run folders whose lock this process holds (a second claim from the same process, as tests make, reuses it)."""


def _lock_run(folder: Path) -> None:
    """An exclusive lock on `folder/.fulltune.lock` (fcntl.flock: released by the OS when the process ends,
    however it ends), or a ConfigError naming the process that holds it."""
    key = folder.resolve()
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"output_dir '{folder}' is in use by another fulltune process (pid {holder}): wait for it to end, "
            "or choose another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def release_run_lock(folder: Path) -> None:
    """Let go of `folder`'s lock at the end of a run (another process may then resume or overwrite it)."""
    fd = _LOCKS.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)
