"""`compare --seeds K`: the statistics of a method's runs over seeds (mean, sd, Student-t interval), the paired
difference to full fine-tuning and its flag, the binomial SE with one seed, and the table, notes and plot that show
them; the seed folders beside a one-seed run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from scipy import stats

from fulltune.compare.runner import Repeats, run_variant
from fulltune.compare.seeds import (
    add_differences,
    binomial_se,
    mean_interval,
    paired_differences,
    seed_folder,
    seed_row,
    seed_values,
)
from fulltune.compare.table import comparison_table, markdown, plot
from fulltune.errors import ConfigError

SETTINGS = {
    "model": "m",
    "data": "d",
    "budget": "1 epoch",
    "global_batch": 8,
    "length": "x",
    "seed": 42,
    "precision": "fp32",
    "device": "cpu",
}


def _run(seed: int, test: float | None, status: str = "ok", **extra) -> dict:
    return {
        "seed": seed,
        "status": status,
        "error": None if status == "ok" else "boom",
        "method": "x",
        "learning_rate": 1e-3,
        "run_dir": f"/cmp/x/seed_{seed}",
        "metric": "accuracy",
        "val": None if test is None else test + 0.01,
        "test": test,
        "test_examples": 290,
        "wall_time_s": 10.0 + seed,
        "peak_memory_bytes": 2**20 * seed,
        "trainable_percent": 100.0,
    } | extra


def test_mean_interval_is_the_student_t_interval_of_the_mean():
    values = [0.80, 0.83, 0.81]
    iv = mean_interval(values)
    sd = math.sqrt(sum((v - 0.8133333) ** 2 for v in values) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)  # 4.303 * sd / sqrt(3)
    assert iv.mean == pytest.approx(0.8133333, abs=1e-6) and iv.sd == pytest.approx(sd, rel=1e-4)
    assert (iv.low, iv.high) == pytest.approx((iv.mean - half, iv.mean + half), rel=1e-4)
    assert not iv.spans_zero and iv.n == 3
    one = mean_interval([0.5])
    assert (one.sd, one.low, one.high, one.spans_zero) == (None, None, None, False)  # no interval from one value
    assert mean_interval([-0.01, 0.02, 0.0]).spans_zero
    assert paired_differences({42: 0.8, 43: 0.7, 44: 0.9}, {42: 0.75, 44: 0.95}) == pytest.approx([0.05, -0.05])
    assert binomial_se(0.9, 100) == pytest.approx(0.03)
    assert seed_values(42, 3) == [42, 43, 44] and seed_folder("/cmp/lora-r8", 43).as_posix() == "/cmp/lora-r8/seed_43"


def test_seed_rows_pair_by_seed_and_flag_a_difference_whose_interval_spans_zero():
    full = seed_row("full", [_run(42, 0.80), _run(43, 0.82), _run(44, 0.81)])
    # LoRA is 0.05 below full on every seed: a significant difference; the probe's differences spread across 0.
    search = {
        "search_trials": 6,
        "search_complete": 5,
        "search_pruned": 1,
        "search_wall_time_s": 120.0,
        "search_peak_rss_bytes": 2**30,
        "best_overrides": {"training.base_learning_rate": 1e-3, "method.lora.r": 16},
    }
    lora = seed_row("lora", [_run(42, 0.75), _run(43, 0.77), _run(44, 0.76)], search)
    probe = seed_row("linear_probe", [_run(42, 0.83), _run(43, 0.78, status="failed"), _run(44, 0.80)])
    rows = [full, lora, probe]
    add_differences(rows)
    assert full["test"] == pytest.approx(0.81) and full["test_n"] == 3 and full["test_low"] < 0.81 < full["test_high"]
    assert full["peak_memory_bytes"] == 44 * 2**20 and full["wall_time_s"] == pytest.approx(53.0)  # max; mean
    assert full["runs_dir"] == "/cmp/x" and [s["seed"] for s in full["seeds"]] == [42, 43, 44]
    assert lora["diff"]["mean"] == pytest.approx(-0.05) and lora["significant"] is True
    assert lora["diff"]["sd"] == pytest.approx(0.0, abs=1e-12) and lora["search_trials"] == 6
    # The probe's failed seed is left out: differences over seeds 42 and 44 only (+0.03, -0.01).
    assert probe["status"] == "ok" and probe["test_n"] == 2 and probe["seed_errors"][0].startswith("seed 43: boom")
    assert probe["diff"]["mean"] == pytest.approx(0.01) and probe["diff"]["n"] == 2 and probe["significant"] is False
    assert "diff" not in full

    head, cells = comparison_table(rows, SETTINGS)
    col = {h: [c[i] for c in cells] for i, h in enumerate(head)}
    assert col["test accuracy"][0] == "0.8100 ± 0.0100"
    assert col["test 95% CI"][0] == "[0.7852, 0.8348]"  # 0.81 ± 4.303 * 0.01 / sqrt(3)
    assert col["Δ test vs full"] == ["—", "-0.0500", "+0.0100"]
    assert col["Δ flag"] == ["—", "significant", "not significant"]
    assert col["Δ 95% CI"][2].startswith("[-") and "search time" in head
    md = markdown(rows, SETTINGS | {"seeds": [42, 43, 44]})
    assert "seeds 42, 43, 44" in md and "95% Student-t interval" in md and '"not significant"' in md
    assert "Failed seeds (left out of the mean and the differences): seed 43: boom" in md
    assert "lora (5 trials finished, 1 pruned): training.base_learning_rate=1e-3, method.lora.r=16." in md
    assert col["search time"] == ["—", "120 s", "—"] and col["search peak memory"][1] == "1.0 GiB"


def test_one_seed_says_no_interval_and_gives_the_binomial_se(tmp_path):
    rows = [
        _run(42, 0.80) | {"method": "full"},
        _run(42, 0.79) | {"method": "lora"},
        _run(42, 0.60) | {"method": "linear_probe"},
    ]
    for r in rows:
        del r["seed"]
    add_differences(rows)
    se = binomial_se(0.8, 290)  # 0.0235
    assert rows[0]["test_se"] == pytest.approx(se)
    assert rows[1]["within_se"] is True and rows[2]["within_se"] is False  # 1 point apart vs 20 points apart
    head, cells = comparison_table(rows, SETTINGS)
    col = {h: [c[i] for c in cells] for i, h in enumerate(head)}
    assert col["test ± SE"][0] == f"± {se:.4f}" and "test 95% CI" not in head
    assert col["Δ flag"] == ["—", "within 1 SE", "beyond 1 SE"] and "Δ 95% CI" not in head
    md = markdown(rows, SETTINGS)
    assert "One seed: no interval can be given" in md and "sqrt(p (1 - p) / n)" in md
    plot(rows, tmp_path / "one.png")  # error bars of one SE
    many = [seed_row(m, [_run(s, t + s / 1000) for s in (42, 43)]) for m, t in (("full", 0.8), ("lora", 0.7))]
    add_differences(many)
    plot(many, tmp_path / "many.png")  # error bars of the 95% interval
    assert (tmp_path / "many.png").read_bytes()[:4] == b"\x89PNG"


def test_seed_folders_never_go_inside_a_one_seed_run(tmp_path):
    """A method folder that holds a one-seed run is refused (left untouched), not mixed with seed_<seed>/ folders."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.yaml").write_text("task: text_classification\n")
    with pytest.raises(ConfigError, match="holds a one-seed run"):
        run_variant(None, [], tmp_path, "full", 1e-4, repeats=Repeats([42, 43]))
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["config.yaml"]


@pytest.mark.slow
def test_compare_over_two_seeds_runs_each_seed_in_its_own_folder_and_reuses_them(tmp_path, text_data):
    """`compare --methods full --seeds 2` on the tiny BERT: seed_0 and seed_1 under full/, the row's mean and
    interval in comparison.json and .md; a second call with --skip_done reuses both runs."""
    from test_compare import _parse, write_compare_config

    config = write_compare_config(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--config", str(config), "--data_dir", str(text_data), "--output_dir", str(out), "--methods", "full"]
    args = _parse([*argv, "--seeds", "2", "training.max_steps=2"])
    assert args.func(args) == 0
    report = json.loads((out / "comparison.json").read_text())
    full = next(r for r in report["runs"] if r["method"] == "full")
    assert [s["seed"] for s in full["seeds"]] == [0, 1] and report["settings"]["seeds"] == [0, 1]
    for seed in (0, 1):
        saved = yaml.safe_load((out / "full" / f"seed_{seed}" / "config.yaml").read_text())
        assert saved["training"]["seed"] == seed and (out / "full" / f"seed_{seed}" / "summary.json").is_file()
    tests = [s["test"] for s in full["seeds"]]
    assert full["test"] == pytest.approx(sum(tests) / 2) and full["test_n"] == 2
    assert full["test_low"] <= full["test"] <= full["test_high"]
    assert "| test 95% CI |" in (out / "comparison.md").read_text()
    again = _parse([*argv, "--seeds", "2", "--skip_done", "training.max_steps=2"])
    assert again.func(again) == 0
    rerun = json.loads((out / "comparison.json").read_text())
    full = next(r for r in rerun["runs"] if r["method"] == "full")
    assert [s["reused"] for s in full["seeds"]] == [True, True]  # not trained again


@pytest.mark.slow
def test_compare_tune_searches_each_method_then_trains_at_the_best_settings(tmp_path, text_data):
    """`compare --methods full --tune 2` on the tiny BERT: the search in full/tune/ (study.json, its trials), the
    seed's run at the best settings found, and the search's cost in the row and the table."""
    pytest.importorskip("optuna")
    from test_compare import _parse, write_compare_config

    config = write_compare_config(tmp_path, training={"num_epochs": 1, "seed": 0, "eval_every_steps": 1})
    out = tmp_path / "cmp"
    argv = ["--config", str(config), "--data_dir", str(text_data), "--output_dir", str(out), "--methods", "full"]
    args = _parse([*argv, "--tune", "2", "training.max_steps=2"])
    assert args.func(args) == 0
    full = next(r for r in json.loads((out / "comparison.json").read_text())["runs"] if r["method"] == "full")
    study = json.loads((out / "full" / "tune" / "study.json").read_text())
    assert full["search_trials"] == 2 and len(study["trials"]) == 2 and full["search_wall_time_s"] > 0
    assert full["search_peak_rss_bytes"] > 0 and full["search_complete"] + full["search_pruned"] == 2
    best = next(t for t in study["trials"] if t["number"] == study["best"])
    assert full["best_overrides"] == best["params"]
    saved = yaml.safe_load((out / "full" / "seed_0" / "config.yaml").read_text())
    assert saved["training"]["base_learning_rate"] == pytest.approx(best["params"]["training.base_learning_rate"])
    assert full["learning_rate"] == pytest.approx(best["params"]["training.base_learning_rate"])
    table = (out / "comparison.md").read_text()
    assert "| search time | search peak memory |" in table and "searched first" in table
    page = out / "full" / "tune" / "tune.html"  # the search's page, drawn from its study.json
    assert f"Best trial: #{best['number']}" in page.read_text()
    from chromium_page import chromium_binary, render

    if chromium_binary() is not None:
        shown = render(page)
        assert shown.console_errors == [] and shown.facts["svgs"] >= 2, shown.console_errors
        if os.environ.get("FULLTUNE_SCREENSHOT_DIR"):
            (Path(os.environ["FULLTUNE_SCREENSHOT_DIR"]) / "compare_tune.png").write_bytes(shown.screenshot)
