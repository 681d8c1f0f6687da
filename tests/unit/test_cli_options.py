"""Every option discoverable: `fulltune config` lists exactly the keys load_config accepts, each with a description;
--help shows defaults everywhere; --version; kebab-case flags; HF Trainer's flat names; one name for one thing in
`prune`; `train` without data is one line and creates nothing; libraries' import noise dropped, their warnings kept."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fulltune.cli import build_parser, main
from fulltune.cli.options import _subparsers, normalize_argv, render_config
from fulltune.config import ConfigError, dotted_items, load_config, to_dict
from fulltune.config.describe import describe_keys

SRC = Path(__file__).resolve().parents[2] / "src"


def test_config_lists_every_key_load_config_accepts():
    listed = describe_keys()
    accepted = {k for k, _ in dotted_items(to_dict(load_config()))}
    assert set(listed) == accepted
    assert len(listed) > 80
    for key, (default, doc) in listed.items():
        assert doc, f"{key} has no description in config.py"
        load_config(None, {key: default})  # each listed key loads as written
    with pytest.raises(ConfigError):
        load_config(None, {"training.no_such_key": 1})


def test_config_command_prints_yaml_that_loads_back(tmp_path, capsys):
    assert main(["config", "--output-dir", str(tmp_path / "x"), "learning_rate=2e-5", "--eval-steps", "7"]) == 0
    text = capsys.readouterr().out
    assert "base_learning_rate: 2.0e-05  # default: 5e-05. Peak learning rate" in text
    assert "eval_every_steps: 7  # default: null." in text
    saved = tmp_path / "printed.yaml"
    saved.write_text(text)
    cfg = load_config(saved)
    assert cfg.training.base_learning_rate == 2e-5 and cfg.training.eval_every_steps == 7
    assert render_config(cfg) == text


def test_hf_trainer_flat_names_map_to_config_keys():
    cfg = load_config(
        None,
        [
            "learning_rate=1e-5",
            "eval_steps=5",
            "max_train_samples=10",
            "label_smoothing_factor=0.1",
            "metric_for_best_model=macro_f1",
            "per_device_eval_batch_size=4",
            "optim=adamw_torch",
            "num_train_epochs=2",
            "per_device_train_batch_size=8",
            "max_seq_length=64",
        ],
    )
    t, d = cfg.training, cfg.data
    assert (t.base_learning_rate, t.eval_every_steps, d.max_samples, t.label_smoothing) == (1e-5, 5, 10, 0.1)
    assert (t.metric, d.eval_batch_size, t.fused_optimizer, t.num_epochs, d.batch_size, d.max_length) == (
        "macro_f1",
        4,
        False,
        2,
        8,
        64,
    )
    with pytest.raises(ConfigError, match="optim 'sgd'"):
        load_config(None, ["optim=sgd"])


def test_kebab_case_and_config_keys_as_flags():
    parser = build_parser()
    argv = normalize_argv(
        ["train", "--output-dir", "o", "--data-dir=d", "--learning-rate", "1e-5", "--training.num_epochs=2", "x=1"],
        parser,
    )
    assert argv == ["train", "--output_dir", "o", "--data_dir=d", "learning_rate=1e-5", "training.num_epochs=2", "x=1"]
    args = parser.parse_args(argv)
    assert args.output_dir == "o" and args.data_dir == "d"
    # evaluate takes no overrides: a config key is an unknown flag there
    with pytest.raises(ConfigError, match="unknown flag --learning-rate for `fulltune evaluate`"):
        normalize_argv(["evaluate", "--learning-rate", "1"], parser)


def test_hf_trainer_flags_mix_with_fulltune_flags_in_any_order():
    parser = build_parser()
    argv = normalize_argv(
        [
            "train",
            "--learning_rate",
            "1e-4",
            "--train_file",
            "a=b.csv",
            "--num_train_epochs",
            "2",
            "--bf16",
            "max_steps=3",
            "--output_dir",
            "o",
            "--text_column",
            "review",
            "--report_to=none",
            "--gradient_checkpointing",
            "0",
            "--num_epochs",
            "4",
            "--training.compile",
        ],
        parser,
    )
    args = parser.parse_args(argv)
    assert (args.train_file, args.output_dir) == ("a=b.csv", "o")
    cfg = load_config(None, args.overrides)
    t = cfg.training
    assert (t.base_learning_rate, t.num_epochs, t.max_steps, t.gradient_checkpointing, t.compile) == (
        1e-4,
        4,
        3,
        False,
        True,
    )
    assert (cfg.hardware.mixed_precision, cfg.data.text_column, cfg.logging.report_to) == ("bf16", "review", [])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--lerning_rate", "1"], "did you mean --learning_rate (sets training.base_learning_rate)?"),
        (["train", "--text_colum", "x"], "did you mean --text_column (sets data.text_column)"),
        (["train", "--eval_strategy", "steps"], "set training.eval_every_steps=N"),
        (["train", "--dropout", "0.1"], "--dropout is ambiguous: say which, e.g. --model.dropout or"),
        (["train", "--learning_rate"], "--learning_rate: expected a value"),
        (["predict", "--checkpont", "x"], "did you mean --checkpoint?"),
    ],
)
def test_a_flag_mistake_is_one_line_with_the_key_to_use(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fulltune: error: ") and expected in err[0], err


def test_every_help_shows_defaults_and_every_flag_has_help(capsys):
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("fulltune ")


def test_prune_takes_the_names_train_uses():
    parser = build_parser()
    new = parser.parse_args(["prune", "--model", "m", "--train_file", "a.txt", "--val_file", "b.txt"])
    old = parser.parse_args(["prune", "--base_model", "m", "--data_file", "a.txt", "--eval_file", "b.txt"])
    assert (new.base_model, new.data_file, new.eval_file) == (old.base_model, old.data_file, old.eval_file)


def test_train_without_data_is_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fulltune: error: no training data")
    assert not out.exists()


@pytest.mark.parametrize(
    "argv", [["--version"], ["train", "--help"], ["compare", "--help"], ["config"], ["train", "--bad_flag"]]
)
def test_parsing_loads_neither_torch_nor_transformers(argv):
    """`--version`, `--help`, `config` and argument errors import no heavy library (a timing would depend on the
    machine)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fulltune", *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode in (0, 2), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "fulltune.cli" in imported
    assert not imported & {"torch", "transformers", "datasets", "numpy"}


def test_library_import_noise_is_dropped_and_other_warnings_kept(caplog):
    # importing fulltune.cli (above) installed the filters
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torchao").warning("something a user should see")
    assert [r.getMessage() for r in caplog.records] == ["something a user should see"]
