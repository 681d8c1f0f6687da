"""The atomic folder writer on its own: a finished write replaces the old folder in one rename, a failed write
leaves the old folder as it was and no temporary folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fulltune.state.checkpoint import atomic_dir


def test_replaces_the_old_folder_whole(tmp_path: Path) -> None:
    final = tmp_path / "best"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert tmp != final and tmp.parent == final.parent
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # the old folder is intact while the new one is written
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_failed_write_keeps_the_old_folder(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-epoch-1"
    final.mkdir()
    (final / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (final / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-epoch-1"]


def test_recovery_removes_fsdp_shard_staging_of_a_dead_save(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from fulltune.files.rundir import recover_run_dir
    from fulltune.state.checkpoint import staging_dir

    mine = staging_dir(tmp_path / "checkpoint-step-4")  # without a process group: this process's pid
    assert mine == tmp_path / f".checkpoint-step-4.shards.tmp-{os.getpid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".checkpoint-step-4.shards.tmp-{int(dead.stdout)}"  # a kill inside an FSDP save left it
    (left / "shards").mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        live = tmp_path / f".checkpoint-step-6.shards.tmp-{other.pid}"  # another process's save in progress
        live.mkdir()
        try:
            actions = recover_run_dir(tmp_path, log=lambda _: None)
        finally:
            other.kill()
    assert not left.exists() and live.exists()
    assert actions == [f"removed {left} (left by an interrupted save)"]
