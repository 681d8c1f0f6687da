"""tune.html from a hand-built study: trials sorted by the metric (direction-aware), one chart per searched key (a
log axis for the learning rate), pruned trials marked with the step they were pruned at, the best trial's report
linked; and the page in headless Chromium (no console errors, charts drawn)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fulltune.report.tune_html import is_learning_rate, sorted_trials, write_tune_html

LR, WD, SCHED = "training.base_learning_rate", "training.weight_decay", "training.lr_scheduler"


def _trial(n: int, state: str, value: float | None, lr: float, curve: list[float], pruned_at: int | None = None):
    return {
        "number": n,
        "state": state,
        "value": value,
        "params": {LR: lr, WD: 0.01 * n, SCHED: "linear" if n % 2 else "cosine"},
        "run_dir": f"trial_{n}",
        "wall_time_s": 30.0 + n,
        "pruned_at": pruned_at,
        "intermediate": [[10 * (i + 1), v] for i, v in enumerate(curve)],
        "worker": f"host-a:{100 + n % 2}",
    }


def study(direction: str = "maximize") -> dict:
    return {
        "metric": "accuracy",
        "direction": direction,
        "best": 2,
        "trials": [
            _trial(0, "complete", 0.71, 2e-5, [0.5, 0.65, 0.71]),
            _trial(1, "pruned", None, 5e-6, [0.3], pruned_at=10),
            _trial(2, "complete", 0.84, 1.2e-4, [0.6, 0.8, 0.84]),
            _trial(3, "failed", None, 9e-4, []),
            _trial(4, "complete", 0.78, 5e-5, [0.55, 0.7, 0.78]),
            _trial(5, "pruned", None, 3e-4, [0.4, 0.5], pruned_at=20),
        ],
    }


def test_trials_are_sorted_by_the_metric_best_first_in_either_direction():
    assert [t["number"] for t in sorted_trials(study())] == [2, 4, 0, 5, 1, 3]
    assert [t["number"] for t in sorted_trials(study("minimize"))] == [0, 4, 2, 1, 5, 3]
    assert is_learning_rate(LR) and is_learning_rate("method.head_lr") and not is_learning_rate(WD)


def test_tune_html_has_the_table_a_chart_per_key_and_the_pruned_steps(tmp_path):
    page = tmp_path / "tune.html"
    write_tune_html(page, study())
    text = page.read_text()
    table = re.search(r"<h2>Trials</h2>.*?<table[^>]*>(.*?)</table>", text, flags=re.S).group(1)
    first_cells = [re.findall(r"<td[^>]*>(.*?)</td>", tr)[0] for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]]
    assert first_cells == ["#2", "#4", "#0", "#5", "#1", "#3"]
    assert "<tr class='best'><td class=''>#2</td>" in table
    assert "Best trial: #2" in text and "href='trial_2/report.html'>its report</a>" in text
    charts = re.findall(r'<svg[^>]*aria-label="([^"]*)"', text)
    assert charts == [LR, WD, SCHED, "validation accuracy of each trial"]
    lr_chart = text[text.index(f'aria-label="{LR}"') : text.index(f'aria-label="{WD}"')]
    assert "base_learning_rate (log)" in lr_chart and ">1e-4<" in lr_chart  # log ticks on round values
    assert lr_chart.count('class="trial"') == 5  # the failed trial reported nothing: no dot
    assert ">cosine<" in text[text.index(f'aria-label="{SCHED}"') :]  # a choice is a category
    assert "#5 pruned at step 20" in text and "Pruned: #1 at step 10 (0.3); #5 at step 20 (0.5)" in text
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert not list(tmp_path.glob(".*tmp*"))


def test_tune_html_renders_in_headless_chromium(tmp_path):
    from chromium_page import chromium_binary, render

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    page = tmp_path / "tune.html"
    write_tune_html(page, study())
    result = render(page)
    assert result.console_errors == [], result.console_errors
    assert result.facts["svgs"] == 4
    keep = os.environ.get("FULLTUNE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "tune.png").write_bytes(result.screenshot)
    empty = tmp_path / "empty" / "tune.html"
    empty.parent.mkdir()
    write_tune_html(empty, {"metric": "loss", "direction": "minimize", "best": None, "trials": []})
    assert "No trial has finished yet" in empty.read_text() and render(empty).console_errors == []
