"""One trial of `tune` as an ordinary run folder: trained by a child `fulltune train` process (runtime/children.py),
whose metrics.jsonl the tune process follows; each validation value goes to the Optuna trial, and when the pruner says
so the child gets SIGTERM (it saves a checkpoint and exits 143, so the folder stays resumable). The locks that keep two
tune processes on one study from running a trial twice live here too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune.config import Config, save_config
from fulltune.files.rundir import LOCK_FILE
from fulltune.runtime.children import Child
from fulltune.state.checkpoint import list_checkpoints

POLL_S = 0.5
"""How often the tune process reads a child's new metrics.jsonl rows and checks whether it has ended."""


@dataclass
class TrialRun:
    """What one child process of a trial did."""

    state: str
    """complete, pruned, failed, or interrupted (Ctrl-C / SIGTERM to tune: the trial stays resumable)."""
    value: float | None = None
    """The best validation metric of a complete run (summary.json)."""
    pruned_at: int | None = None
    wall_time_s: float = 0.0
    cpu_time_s: float | None = None
    """User + system CPU seconds of the child (start-up included)."""
    peak_rss_bytes: int | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (waiting for it): one tune process at a time asks the study for a
    trial and takes its trial lock, so another never sees a trial half-claimed."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def try_lock(path: Path, create: bool = True) -> int | None:
    """A held exclusive lock on `path` (its file descriptor; the OS lets go when this process ends, however it
    ends), or None when another process holds it (or, with `create` false, when there is no such file)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def wait_for_run_lock(run_dir: Path, log: Callable[[str], None], limit_s: float = 600.0) -> None:
    """Wait until no process holds the run folder's lock: a trial's child from a killed tune process saves its
    checkpoint on the SIGTERM that the kill sent it, then exits."""
    start, said = time.monotonic(), False
    while (fd := try_lock(run_dir / LOCK_FILE, create=False)) is None and (run_dir / LOCK_FILE).exists():
        if not said:
            log(f"    waiting for the earlier process of {run_dir.name} to save its checkpoint and end")
            said = True
        if time.monotonic() - start > limit_s:
            return  # the child reports the folder in use, as one line
        time.sleep(POLL_S)
    if fd is not None:
        os.close(fd)


# ------------------------------------------------------------------------------------------------- the child


def resume_point(run_dir: Path) -> str:
    """How a trial killed midway goes on, in words for the log."""
    found = list_checkpoints(run_dir)
    return f"resumes from {found[-1].name}" if found else "is retried from the start (no checkpoint was saved)"


def _new_rows(path: Path, pos: int) -> tuple[list[dict[str, Any]], int]:
    """Whole JSON lines of `path` from byte `pos` on, and the position after them. A file shorter than `pos` was
    rewritten (a resumed run drops the rows after its checkpoint): read it again from the start."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    pos = 0 if size < pos else pos
    with open(path, "rb") as f:
        f.seek(pos)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows, pos + end


def error_line(log: Path) -> str:
    """The child's one-line error: `fulltune: error: ...`, else its last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("fulltune: error:"):
            return line.removeprefix("fulltune: error:").strip()
    return lines[-1][:300] if lines else "no output"


class Reporter:
    """Hands each validation value of the followed run to the Optuna trial (once per step) and asks the pruner, except
    at the run's last step (stopping it there saves nothing, and a finished run is a result) and, for `must_finish`
    trials (the study's last, while no trial has completed), at all: a study always ends with a result."""

    def __init__(self, trial: Any, metric: str, reported: set[int], must_finish: Callable[[], bool] | None = None):
        self.trial, self.metric = trial, metric
        self.reported = set(reported)
        """Steps already reported (by an earlier process of a resumed trial)."""
        self.must_finish = must_finish

    def should_stop(self, row: dict[str, Any], total_steps: int | None = None) -> bool:
        """Report `row` (a metrics.jsonl row of a run of `total_steps` optimizer steps); True when the pruner stops
        the trial here."""
        if row.get("split") != "val" or self.metric not in row:
            return False
        step = int(row["step"])
        if step not in self.reported:
            self.trial.report(float(row[self.metric]), step)
            self.reported.add(step)
        if total_steps is not None and step >= total_steps:
            return False
        if self.must_finish is not None and self.must_finish():
            return False
        return bool(self.trial.should_prune())


def total_steps(run_dir: Path) -> int | None:
    """The optimizer steps of the run in `run_dir`, as its latest start (or resume) wrote them in run_history.jsonl."""
    steps = None
    with contextlib.suppress(OSError):
        for line in (run_dir / "run_history.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "start" and isinstance(event.get("total_steps"), int):
                    steps = event["total_steps"]
    return steps


def train_child(cfg: Config, run_dir: Path, log_file: Path, reporter: Reporter | None, resume: bool) -> TrialRun:
    """Train `cfg` (output_dir: `run_dir`) in a child `fulltune train`, following its validation rows; SIGTERM to it
    when `reporter` says the trial is pruned. The child's output goes to `log_file`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    argv = ["train", "--config", str(run_dir / "config.yaml")] + (["--resume", "auto"] if resume else [])
    start, pos, pruned_at, steps = time.perf_counter(), 0, None, None
    child = Child(argv, log_file, die_with_parent=True)
    try:
        while True:
            ended = child.poll() is not None
            rows, pos = _new_rows(run_dir / "metrics.jsonl", pos)
            for row in rows:
                if row.get("split") == "val" and steps is None:
                    steps = total_steps(run_dir)  # written before the run's first row
                if pruned_at is None and reporter is not None and reporter.should_stop(row, steps):
                    pruned_at = int(row["step"])
                    child.signal(signal.SIGTERM)  # it saves a checkpoint and exits 143
            if ended:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        child.wait()  # the child got the same signal: let it save its checkpoint first
        raise
    wall = time.perf_counter() - start
    run = TrialRun("complete", wall_time_s=wall, cpu_time_s=child.cpu_s, peak_rss_bytes=child.peak_rss_bytes)
    if pruned_at is not None:
        run.state, run.pruned_at = "pruned", pruned_at
    elif child.returncode in (130, 143, -signal.SIGTERM, -signal.SIGINT):
        run.state, run.error = "interrupted", "stopped by a signal (resumable)"
    elif child.returncode != 0 or not (run_dir / "summary.json").is_file():
        run.state, run.error = "failed", error_line(log_file)
    else:
        run.summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return run
