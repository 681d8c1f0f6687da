"""`fulltune tune`: the search space and its checks, trials as run folders that never read the test split, study.json
and best_config.yaml, a search killed midway and resumed, and two processes on one study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import call_cli, tiny_bert_train_args

from fulltune.config import load_config
from fulltune.config.methods import SEARCH_LR_RANGE
from fulltune.errors import ConfigError, FulltuneError
from fulltune.tune import study as study_module
from fulltune.tune.space import check_space, default_space, read_space, suggest

optuna = pytest.importorskip("optuna")

# Room for the learning rate to matter in a few steps of a tiny random BERT.
WIDE_SPACE = "training.base_learning_rate: {low: 1.0e-5, high: 3.0e-2, log: true}\ntraining.warmup_ratio: [0.0, 0.2]\n"


def tune_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`fulltune tune` argv for the tiny BERT on a text folder: 32 rows, batch 8, 2 epochs, val every 2 steps."""
    train = tiny_bert_train_args(data, out, "training.seed=0", "training.num_epochs=2", "data.batch_size=8")
    return ["tune", *train[1:], "training.eval_every_steps=2", *extra]


def _dotted(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _starts(run_dir: Path) -> int:
    """How many processes trained in a run folder (run_history.jsonl: one row per start or resume)."""
    return len((run_dir / "run_history.jsonl").read_text().splitlines())


def test_default_space_per_method_and_space_file_checks(tmp_path):
    cfg = load_config(None, {"method.name": "lora"})
    space = default_space(cfg)
    assert space["training.base_learning_rate"] == {"low": SEARCH_LR_RANGE["lora"][0], "high": 3e-3, "log": True}
    assert "method.lora.r" in space and "training.layerwise_lr.decay_rate" not in space
    full = default_space(load_config(None, {"method.name": "full"}))
    assert full["training.layerwise_lr.enabled"] is True and "method.lora.r" not in full
    probe = default_space(load_config(None, {"method.name": "linear_probe"}))
    assert probe["training.base_learning_rate"]["low"] == SEARCH_LR_RANGE["linear_probe"][0]
    assert check_space(cfg, space) == space

    path = tmp_path / "space.yaml"
    for text, needle in [
        ("training.learning_rat: {low: 1.0e-5, high: 1.0e-3}\n", "training.learning_rat"),
        ("training.warmup_ratio: {low: 0.1}\n", "expected {low: L, high: H"),
        ("training.warmup_ratio: {low: 0.0, high: 2.0}\n", "training.warmup_ratio' = 2.0"),
        ("training.base_learning_rate: {low: 0, high: 1.0e-3, log: true}\n", "low > 0 with log"),
        ("method.lora.r: []\n", "non-empty list"),
        ("- a list\n", "expected a mapping"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"--space '{path}'.*") as err:
            read_space(path, cfg)
        assert needle in str(err.value) and "\n" not in str(err.value)

    path.write_text("method.lora.r: [4, 16]\ntraining.warmup_ratio: {low: 0.0, high: 0.2}\ndata.max_length: 64\n")
    checked = read_space(path, cfg)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    params = suggest(study.ask(), checked)
    assert params["method.lora.r"] in (4, 16) and 0 <= params["training.warmup_ratio"] <= 0.2
    assert params["data.max_length"] == 64  # a plain value is set, not searched


def test_missing_optuna_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(study_module, "optuna", None)
    with pytest.raises(FulltuneError, match=r"pip install 'fulltune\[tune\]'"):
        study_module.run_study(load_config(None), tmp_path / "tune", trials=1)


def test_tune_one_trial_writes_study_json_and_a_trainable_best_config(tmp_path, text_data):
    (text_data / "test.tsv").write_text("not a table of this data\n")  # reading it would fail: a trial never does
    out = tmp_path / "tune"
    assert call_cli(*tune_args(text_data, out, "--trials", "1")) == 0
    study = json.loads((out / "study.json").read_text())
    assert (study["metric"], study["direction"], study["best"]) == ("accuracy", "maximize", 0)
    (trial,) = study["trials"]
    keys = {"number", "state", "value", "params", "run_dir", "wall_time_s", "pruned_at", "intermediate", "worker"}
    assert keys <= set(trial) and trial["state"] == "complete" and trial["run_dir"] == "trials/trial_000"
    assert [step for step, _ in trial["intermediate"]] == [2, 4, 6, 8]  # 32 rows / batch 8, 2 epochs, every 2 steps
    summary = json.loads((out / "trials" / "trial_000" / "summary.json").read_text())
    assert "test" not in summary and summary["best_val"]["accuracy"] == trial["value"]

    best = load_config(out / "best_config.yaml")
    assert best.data.read_test and Path(best.output_dir) == out / "best"
    assert set(trial["params"]) == set(default_space(best))
    assert all(_dotted(best, key) == value for key, value in trial["params"].items())

    with pytest.raises(ConfigError, match="fulltune tune"):  # a tune folder is never a train folder
        call_cli(*tiny_bert_train_args(text_data, out))
    with pytest.raises(ConfigError, match="--resume auto"):
        call_cli(*tune_args(text_data, out, "--trials", "1"))
    assert call_cli(*tune_args(text_data, out, "--trials", "1", "--resume", "auto")) == 0
    assert _starts(out / "trials" / "trial_000") == 1  # the finished trial is not run again


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fulltune", *argv]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _val_rows(path: Path) -> int:
    return path.read_text().count('"split": "val"') if path.is_file() else 0


@pytest.mark.slow
def test_tune_killed_in_its_fourth_trial_resumes_to_the_same_study(tmp_path, text_data):
    space = tmp_path / "space.yaml"
    space.write_text(WIDE_SPACE)
    flags = ("--trials", "4", "--space", str(space), "--pruner", "none")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert call_cli(*tune_args(text_data, whole, *flags)) == 0

    proc = subprocess.Popen(_cli(*tune_args(text_data, killed, *flags)), env=_env(), stdout=subprocess.DEVNULL)
    fourth = killed / "trials" / "trial_003" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while _val_rows(fourth) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # in the middle of the fourth trial
    proc.wait()
    assert call_cli(*tune_args(text_data, killed, *flags, "--resume", "auto")) == 0

    a, b = (json.loads((d / "study.json").read_text()) for d in (whole, killed))
    assert [t["state"] for t in b["trials"]] == ["complete"] * 4
    assert [_starts(killed / "trials" / f"trial_{n:03d}") for n in range(4)] == [1, 1, 1, 2]  # resumed, not rerun
    assert [t["params"] for t in b["trials"]] == [t["params"] for t in a["trials"]]
    assert [t["value"] for t in b["trials"]] == pytest.approx([t["value"] for t in a["trials"]])
    assert b["best"] == a["best"]
    best_a, best_b = (load_config(d / "best_config.yaml") for d in (whole, killed))
    assert best_b.training == best_a.training and best_b.method == best_a.method


@pytest.mark.slow
def test_two_tune_processes_work_on_one_study(tmp_path, text_data):
    space = tmp_path / "space.yaml"
    space.write_text(WIDE_SPACE)
    argv = tune_args(text_data, tmp_path / "tune", "--trials", "4", "--space", str(space))
    argv += ["--storage", str(tmp_path / "shared.journal")]
    procs = [subprocess.Popen(_cli(*argv), env=_env(), stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    study = json.loads((tmp_path / "tune" / "study.json").read_text())
    assert [t["number"] for t in study["trials"]] == [0, 1, 2, 3]
    assert all(t["state"] in ("complete", "pruned") for t in study["trials"])
    assert len({t["worker"] for t in study["trials"]}) == 2  # both processes took trials
    assert all(_starts(tmp_path / "tune" / t["run_dir"]) == 1 for t in study["trials"])  # none run twice


def test_plan_says_what_a_search_costs():
    from fulltune.cli.plan import search_cost
    from fulltune.planning.recommend import run_steps

    cfg = load_config(None, {"data.batch_size": 16, "training.num_epochs": 3})
    assert run_steps(cfg, 1000) == 63 * 3 and run_steps(cfg, None) is None
    report = {"methods": [{"method": "lora", "step_seconds": 0.5}], "recommendation": {"method": "lora"}}
    (line,) = search_cost(report | {"steps_per_run": 189})
    assert "up to N x 1.6 min (189 steps x 0.50 s/step" in line and "pruning" in line
    assert search_cost(report | {"steps_per_run": None}) == []


def test_each_validation_row_goes_to_the_pruner_once():
    from fulltune.tune.trial import Reporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1))
    first = study.ask()
    for step, value in ((2, 0.9), (4, 0.95)):
        first.report(value, step)
        assert not first.should_prune()  # the pruner keeps each trial's value at each rung
    study.tell(first, 0.95)
    trial = study.ask()
    reporter = Reporter(trial, "accuracy", reported={2})  # step 2 came from an earlier process of this trial
    assert not reporter.should_stop({"split": "train", "step": 2, "accuracy": 0.1})  # training rows are not reported
    assert not reporter.should_stop({"split": "val", "step": 2, "loss": 0.7})  # nor rows without the metric
    assert not reporter.should_stop({"split": "val", "step": 4, "accuracy": 0.5}, total_steps=4)  # its last step
    assert reporter.should_stop({"split": "val", "step": 4, "accuracy": 0.5}, total_steps=6)  # trails: pruned
    assert study.trials[1].intermediate_values == {4: 0.5}
    last = Reporter(study.ask(), "accuracy", reported=set(), must_finish=lambda: True)
    assert not last.should_stop({"split": "val", "step": 4, "accuracy": 0.1}, total_steps=6)  # runs whole


def test_halving_lets_the_first_trial_set_the_bar_and_the_last_one_finish(tmp_path):
    """The first trial at the rung stops there (its value is the bar); a later one that beats it goes on; the
    study's last trial runs whole while none has completed."""
    from fulltune.tune.trial import Reporter

    study_module.require_optuna()
    study = optuna.create_study(direction="maximize", pruner=study_module.make_pruner("halving", 30))
    assert study.pruner._min_resource == 10
    search = study_module.Search.__new__(study_module.Search)
    search.study, search.trials = study, 3

    def look(value: float) -> bool:
        trial = study.ask()
        reporter = Reporter(trial, "accuracy", set(), lambda: search._must_finish(trial.number))
        stop = reporter.should_stop({"split": "val", "step": 10, "accuracy": value}, total_steps=30)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if stop else study.tell(trial, value)
        return stop

    assert look(0.8)  # the first at step 10: stopped, the bar is 0.8
    assert look(0.7)  # trails the bar
    assert not look(0.6)  # the last trial, nothing completed: it finishes
    study = optuna.create_study(direction="maximize", pruner=study_module.make_pruner("halving", 30))
    search.study = study
    assert look(0.8) and not look(0.9)  # beats the bar: goes on


@pytest.mark.slow
def test_final_trains_the_best_settings_over_seeds_and_scores_the_test_split(tmp_path, text_data, capsys):
    out = tmp_path / "tune"
    assert call_cli(*tune_args(text_data, out, "--trials", "1", "--final", "2")) == 0
    final = json.loads((out / "final.json").read_text())
    assert [r["seed"] for r in final["runs"]] == [0, 1] and final["metric"] == "accuracy"
    tests = [r["test"] for r in final["runs"]]
    assert all(0 <= t <= 1 for t in tests) and final["mean"] == pytest.approx(sum(tests) / 2)
    assert final["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2**0.5)
    best = json.loads((out / "study.json").read_text())["trials"][0]["params"]
    for seed in (0, 1):
        cfg = load_config(out / "final" / f"seed_{seed}" / "config.yaml")
        assert cfg.training.seed == seed and cfg.data.read_test
        assert all(_dotted(cfg, key) == value for key, value in best.items())
    assert "over 2 seeds" in capsys.readouterr().out


def test_pruners_by_name():
    study_module.require_optuna()
    assert study_module.make_pruner("hyperband", 50)._max_resource == 50  # brackets from the start, not "auto"
    assert isinstance(study_module.make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="halving, hyperband, none"):
        study_module.make_pruner("median")
