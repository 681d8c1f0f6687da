"""`tune`'s pruners: Optuna's successive halving (with a first rung that lets the high learning rates show, the first
trial at a rung as the bar, and a lead within the noise of an accuracy counted as a tie) or Hyperband, or none."""

from __future__ import annotations

import math
from typing import Any

from fulltune.errors import ConfigError

try:
    import optuna
except ImportError:  # the `tune` extra; study.require_optuna says so before any pruner is made
    optuna = None

PRUNERS = ("halving", "hyperband", "none")

TIE_SE = 0.25
"""A lead at a rung smaller than this many standard errors of the trial's accuracy (binomial, on its validation
examples: a quarter of one is 2-3 examples of 500-900) is a tie, not a lead."""

REDUCTION = 4
"""Successive halving's reduction factor (Optuna's default): the rungs are a third of the run, then x4."""


def make_pruner(kind: str, run_steps: int | None = None, metric: str | None = None) -> Any:
    """Successive halving (first rung at a third of `run_steps`, the optimizer steps of one run; the first trial to
    reach a rung sets the bar there and stops; with `metric` accuracy, `TiesStop`), Hyperband (its brackets up to
    `run_steps`), or none."""
    if kind == "halving":
        # A fixed first rung: with "auto", trials before the first complete one keep no rung values, so the second
        # trial would be compared with nothing. A third of the run, not step 1 or a quarter: at the first looks every
        # setting is still near chance on some data (SST-2 at step 10), and until the warmup is well over the high
        # learning rates trail the low ones they end ahead of (SST-2, 5,000 rows: the best of 8 trials ranked 7th at
        # a quarter, 1st at a third). bootstrap_count=1: the first trial at a rung has nothing to be compared with;
        # running it whole would spend a run on the sampler's first random draw, so its value becomes the bar the
        # next trials must beat (the study's last trial runs whole while none has completed: trial.Reporter).
        halving = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, (run_steps or 3) // 3), reduction_factor=REDUCTION, bootstrap_count=1
        )
        return TiesStop(halving) if metric == "accuracy" else halving
    if kind == "hyperband":  # "auto" would wait for a completed trial, which then keeps no rung values
        return optuna.pruners.HyperbandPruner(max_resource=run_steps or "auto")
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner '{kind}': choose from {', '.join(PRUNERS)}")


class TiesStop(optuna.pruners.BasePruner if optuna else object):
    """Successive halving where a lead within noise is a tie. While fewer than 2 x the reduction factor trials have
    reached a rung, halving lets a trial go on when it is the best there, by any margin: a search whose sampler
    keeps finding settings about as good as the best then runs most of its trials whole on leads of one validation
    example (SST-2, 8 trials: four ran whole, two of them on such leads). Here such a trial must also lead the best
    other value at the rung by `TIE_SE` standard errors of its accuracy, sqrt(p (1 - p) / n) on the n validation
    examples of its run (the trial's user attribute `val_examples`, set by trial.Reporter), else it stops as a
    trailing trial does."""

    def __init__(self, halving: Any) -> None:
        self._halving = halving

    def prune(self, study: Any, trial: Any) -> bool:
        if self._halving.prune(study, trial):
            return True
        n = trial.user_attrs.get("val_examples")
        if not n:
            return False
        now = study._storage.get_trial(trial._trial_id).system_attrs  # the rungs halving just recorded
        promoted = [k for k in now if k.startswith("completed_rung_") and k not in trial.system_attrs]
        higher = study.direction == optuna.study.StudyDirection.MAXIMIZE
        others_all = [t for t in study.get_trials(deepcopy=False) if t._trial_id != trial._trial_id]
        for key in promoted:
            others = [t.system_attrs[key] for t in others_all if key in t.system_attrs]
            if not others or len(others) + 1 >= 2 * REDUCTION:  # nothing to lead, or halving's top quarter
                continue
            value = now[key]
            margin = TIE_SE * math.sqrt(max(value * (1 - value), 0.0) / n)
            lead = value - max(others) if higher else min(others) - value
            if lead < margin:
                return True
        return False
