"""How a `train` ends early: a run that fails before it starts leaves no folder it created (nor files in a folder
that was there), and SIGTERM, as schedulers send it, stops like Ctrl-C: a checkpoint where the run was, the resume
hint, and `--resume auto` goes on from there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_bert_train_args

from fulltune.cli import main
from fulltune.state import checkpoint as ckpt


def _fulltune(argv: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "fulltune", *argv], env=env, text=True, **kwargs)


def test_failed_train_leaves_no_folder_behind(tmp_path, text_data, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    proc = _fulltune(tiny_bert_train_args(text_data, out, "data.text_column=nope"), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and err.count("fulltune: error:") == 1 and "nope" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]  # new/deeper/run: none of it is left

    # A folder that was there (empty) stays, as it was: no record, no lock file, no data cache.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(tiny_bert_train_args(text_data, empty, "model.name_or_path=no/such-model", "model.tiny_config=null")) != 0
    )
    assert "fulltune: error:" in capsys.readouterr().err
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_sigterm_saves_a_checkpoint_and_resume_auto_continues(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    argv = tiny_bert_train_args(
        text_data, out, "data.batch_size=8", "training.num_epochs=1000", "logging.log_every_steps=1"
    )
    proc = _fulltune(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text()):  # a step done: mid-run, past start-up
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signal.SIGTERM, err
    said = re.search(
        r"fulltune: stopped by SIGTERM at optimizer step (\d+); checkpoint: (\S+); resume with --resume auto", err
    )
    assert said, err
    step, saved = int(said[1]), Path(said[2])
    assert ckpt.list_checkpoints(out)[-1] == saved and ckpt.read_train_state(saved).optimizer_step == step
    assert f"stopped by SIGTERM at optimizer step {step}" in (out / "train.log").read_text()

    assert main([*argv, f"training.max_steps={step + 2}", "--resume", "auto"]) == 0
    assert f"resumed from {saved} at optimizer step {step}" in capsys.readouterr().out
    assert ckpt.read_train_state(ckpt.list_checkpoints(out)[-1]).optimizer_step == step + 2
