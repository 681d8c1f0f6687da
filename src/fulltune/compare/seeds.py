"""What `compare --seeds K` makes of repeated runs: the seeds (training.seed = base seed + i, the same for every
method, so that runs pair), a run folder per seed (<output_dir>/<method>/seed_<seed>/), a method's row from its
seeds (the test metric's mean ± standard deviation and 95% Student-t interval), and the paired difference to full
fine-tuning with its interval and whether it is significant. With one seed no interval can be given; for accuracy
the binomial standard error on the test set stands in.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scipy import stats

REFERENCE = "full"
"""The row differences are taken against: full fine-tuning."""
SEARCH_FOLDER = "tune"
"""A method's search (`compare --tune N`) goes to <output_dir>/<method>/tune/."""
CONFIDENCE = 0.95


def seed_values(base: int, count: int) -> list[int]:
    """The seeds every method runs with: base, base + 1, ..., base + count - 1."""
    return [base + i for i in range(count)]


def seed_folder(method_dir: Path, seed: int) -> Path:
    """One seed's run folder inside the method's folder: lora-r8/seed_43."""
    return Path(method_dir) / f"seed_{seed}"


# ------------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    """The mean of `n` values with their sample standard deviation and a Student-t interval (None for n < 2)."""

    mean: float
    sd: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def spans_zero(self) -> bool:
        return self.low is not None and self.high is not None and self.low <= 0.0 <= self.high


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, standard deviation and the two-sided Student-t interval of the mean (n - 1 degrees of freedom)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, None, n)
    sd = statistics.stdev(values)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, mean - half, mean + half, n)


def paired_differences(values: dict[int, float], reference: dict[int, float]) -> list[float]:
    """value - reference for each seed both have, in seed order (a failed seed pairs with nothing)."""
    return [values[s] - reference[s] for s in sorted(values) if s in reference]


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


# ------------------------------------------------------------------------------------------------- rows


def seed_row(label: str, runs: list[dict[str, Any]], search: dict[str, Any] | None = None) -> dict[str, Any]:
    """A method's row from its runs, one per seed (each a row of `runner.run_method` with its "seed"): the first
    good run's facts, the test metric's mean/sd/interval over the good runs, the mean validation metric, test top-5,
    wall time and samples/s of a run, the largest peak memory, and the search's cost and result when there was one."""
    good = [r for r in runs if r.get("status") == "ok"]
    failed = [r for r in runs if r.get("status") != "ok"]
    first = {k: runs[0].get(k) for k in ("learning_rate", "run_dir", "peak_rss_bytes")}
    row: dict[str, Any] = dict(good[0]) if good else first | {"status": "failed"}
    row |= {
        "method": label,
        "runs_dir": str(Path(runs[0]["run_dir"]).parent),
        "seeds": [_seed_facts(r) for r in runs],
        "seed_errors": [f"seed {r['seed']}: {r['error']} (log: {r['run_dir']}/compare.log)" for r in failed],
        "error": "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed) or None,
    }
    if search:
        row |= search
    if not good:
        return row
    for key in ("test", "val"):
        values = [r[key] for r in good if r.get(key) is not None]
        if values:
            iv = mean_interval(values)
            row |= {key: iv.mean, f"{key}_sd": iv.sd, f"{key}_low": iv.low, f"{key}_high": iv.high, f"{key}_n": iv.n}
    picks = {"wall_time_s": _mean, "samples_per_s": _mean, "test_top5": _mean, "peak_memory_bytes": max}
    for key, pick in (picks | {"peak_rss_bytes": max}).items():
        values = [r[key] for r in good if r.get(key) is not None]
        row[key] = pick(values) if values else None
    return row


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _seed_facts(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("seed", "status", "run_dir", "val", "test", "test_examples", "wall_time_s", "peak_memory_bytes", "error")
    return {k: r.get(k) for k in keys} | {"reused": bool(r.get("reused"))}


def add_differences(rows: list[dict[str, Any]]) -> None:
    """Each row's test difference to full fine-tuning (in place): over seeds, the paired differences' mean and
    interval ("diff", a dict of Interval's fields) and "significant" (the interval leaves out 0); with one seed,
    the difference alone and, for accuracy, the binomial standard error of each row ("test_se")."""
    one_seed = not any(r.get("seeds") for r in rows)  # over seeds, the intervals say it (not a mix of both)
    for r in rows:
        n = r.get("test_examples")
        if one_seed and r.get("metric") == "accuracy" and r.get("test") is not None and n:
            r["test_se"] = binomial_se(r["test"], n)
    ref = next((r for r in rows if r.get("method") == REFERENCE and r.get("status") == "ok"), None)
    if ref is None or ref.get("test") is None:
        return
    for r in rows:
        if r is ref or r.get("status") != "ok" or r.get("test") is None or not r.get("learning_rate"):
            continue  # the untrained row (no learning rate) is a floor, not a method to test against full
        if r.get("seeds") and ref.get("seeds"):
            diffs = paired_differences(_by_seed(r), _by_seed(ref))
            if diffs:
                iv = mean_interval(diffs)
                r["diff"] = asdict(iv)
                r["significant"] = None if iv.n < 2 else not iv.spans_zero
        elif not r.get("seeds") and not ref.get("seeds"):
            r["diff"] = asdict(Interval(r["test"] - ref["test"], None, None, None, 1))
            if r.get("test_se") is not None and ref.get("test_se") is not None:
                r["within_se"] = abs(r["diff"]["mean"]) <= math.hypot(r["test_se"], ref["test_se"])


def _by_seed(r: dict[str, Any]) -> dict[int, float]:
    return {s["seed"]: s["test"] for s in r["seeds"] if s.get("status") == "ok" and s.get("test") is not None}
