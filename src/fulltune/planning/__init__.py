"""`fulltune plan`'s machinery: model and data facts (`facts`), the analytic memory estimate (`estimate`), the
measured dry run (`dryrun`) and the recommendation (`recommend`). The command itself is `fulltune.cli.plan`."""

from fulltune.planning.dryrun import dry_run, dry_runs
from fulltune.planning.estimate import Estimate, estimate
from fulltune.planning.facts import Facts, count_examples, inspect_model
from fulltune.planning.recommend import FIT_FRACTION, Recommendation, plan, recommend, with_method

__all__ = [
    "FIT_FRACTION",
    "Estimate",
    "Facts",
    "Recommendation",
    "count_examples",
    "dry_run",
    "dry_runs",
    "estimate",
    "inspect_model",
    "plan",
    "recommend",
    "with_method",
]
