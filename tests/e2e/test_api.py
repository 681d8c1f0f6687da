"""The Python API: `fulltune.train` returns the run folder, best/ and the metrics; `evaluate` and `predict` return
what the commands print; mistakes raise the project's errors in Python's words; `import fulltune` stays light, and
no library progress bar reaches the output (a notebook cell)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BERT

import fulltune
from fulltune.errors import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"


def test_import_fulltune_loads_no_torch():
    code = "import sys, fulltune; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "[]", done.stderr


def test_train_evaluate_predict_from_python(tmp_path, text_data, capfd):
    out = tmp_path / "run"
    result = fulltune.train(
        {"model": {"tiny_config": TINY_BERT}, "hardware": {"mixed_precision": "no"}},
        data_dir=str(text_data),
        text_column="sentence",
        output_dir=str(out),
        num_train_epochs=1,
        batch_size=8,
        tensorboard=False,
    )
    assert isinstance(result, fulltune.TrainResult)
    assert result.run_dir == out and result.best_checkpoint == out / "best"
    assert (out / "best" / "config.json").is_file() and "accuracy" in result.metrics["best_val"]
    assert "test" in result.metrics

    metrics = fulltune.evaluate(result.best_checkpoint, data_dir=str(text_data), split="test")
    assert 0.0 <= metrics["accuracy"] <= 1.0
    one = fulltune.predict(result.best_checkpoint, "a fine film number 3", top_k=2)
    assert one["input"] == "a fine film number 3" and len(one["top_k"]) == 2
    assert len(fulltune.predict(result.best_checkpoint, ["a", "b", "c"])) == 3
    err = capfd.readouterr().err
    assert "it/s]" not in err and "s/it]" not in err  # no tqdm bar (ours, transformers' or datasets')

    importlib.import_module("fulltune.training.tasks")  # the trainer's package: fulltune.train stays the API

    assert callable(fulltune.train)
    with pytest.raises(ConfigError) as again:  # the run folder is taken: the hint names keyword arguments
        fulltune.train(None, data_dir=str(text_data), output_dir=str(out), **{"model.tiny_config": TINY_BERT})
    assert 'resume="auto"' in str(again.value) and "overwrite=True" in str(again.value)
    assert "--" not in str(again.value)
    with pytest.raises(ConfigError, match="not_a_key=1: not a config key"):
        fulltune.train(None, not_a_key=1)
