"""`tune`'s search: an Optuna study (TPE sampling, seeded; successive-halving or Hyperband pruning on the validation
metric at each evaluation) whose trials are run folders <output_dir>/trials/trial_NNN. Its state is Optuna's
storage, by default a journal file in the output folder, so a killed search goes on with `resume` (finished trials
kept, a trial killed midway resumed from its checkpoint) and several processes, on one machine or many (`storage`),
work on one study. Writes study.json and best_config.yaml; `run_final` trains the best settings over several seeds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulltune.config import Config, save_config, to_dict
from fulltune.data.text import run_inputs
from fulltune.errors import ConfigError, FulltuneError, TrainingError
from fulltune.files.rundir import claim_output, write_atomic
from fulltune.planning.facts import count_examples
from fulltune.planning.recommend import run_steps
from fulltune.report.tune_html import write_tune_html
from fulltune.training.tasks import TASKS, infer_task, validation_metric
from fulltune.tune.space import Space, check_space, default_space, suggest, trial_config
from fulltune.tune.trial import Reporter, TrialRun, exclusive, resume_point, train_child, try_lock, wait_for_run_lock

try:
    import optuna
except ImportError:  # the `tune` extra
    optuna = None

TUNE_ENTRIES = ("study.journal*", "study.json", "tune.html", "best_config.yaml", "trials", "final", "final.json")
"""What `tune` writes into its output folder (best_config.yaml's own run goes to <output_dir>/best when trained)."""

JOURNAL = "study.journal"
ASK_LOCK = "trials/.ask.lock"
PRUNERS = ("halving", "hyperband", "none")


@dataclass
class StudyResult:
    """The outcome of a search, for `tune`'s summary and `compare --tune`."""

    best_overrides: dict[str, Any] | None
    """The best trial's settings, dotted key -> value (None when no trial completed)."""
    best_value: float | None
    metric: str
    direction: str
    """maximize or minimize."""
    n_complete: int
    n_pruned: int
    wall_time_s: float
    """This call's whole search, start to end."""
    peak_rss_bytes: int | None
    """The largest peak resident set over the study's trial processes."""
    best_run_dir: Path | None


def require_optuna() -> Any:
    if optuna is None:
        raise FulltuneError("fulltune tune needs Optuna, which is not installed: pip install 'fulltune[tune]'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fulltune's own log lines say what happens
    return optuna


def open_storage(out_dir: Path, storage: str | None) -> Any:
    """Optuna storage: a database URL (sqlite:///..., postgresql://...) as given, a journal file path, or by default
    the journal file in the output folder."""
    if storage and "://" in storage:
        return storage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(Path(storage) if storage else out_dir / JOURNAL)))


def make_pruner(kind: str, run_steps: int | None = None) -> Any:
    """Successive halving (first rung at a third of `run_steps`, the optimizer steps of one run, then x4; the first
    trial to reach a rung sets the bar there and stops), Hyperband (its brackets up to `run_steps`), or none."""
    if kind == "halving":
        # A fixed first rung: with "auto", trials before the first complete one keep no rung values, so the second
        # trial would be compared with nothing. A third of the run, not step 1 or a quarter: at the first looks every
        # setting is still near chance on some data (SST-2 at step 10), and until the warmup is well over the high
        # learning rates trail the low ones they end ahead of (SST-2, 5,000 rows: the best of 8 trials ranked 7th at
        # a quarter, 1st at a third). bootstrap_count=1: the first trial at a rung has nothing to be compared with;
        # running it whole would spend a run on the sampler's first random draw, so its value becomes the bar the
        # next trials must beat (the study's last trial runs whole while none has completed: trial.Reporter).
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, (run_steps or 3) // 3), bootstrap_count=1)
    if kind == "hyperband":  # "auto" would wait for a completed trial, which then keeps no rung values
        return optuna.pruners.HyperbandPruner(max_resource=run_steps or "auto")
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner '{kind}': choose from {', '.join(PRUNERS)}")


def _sampler(seed: int, number: int, trials: int) -> Any:
    """TPE seeded by the study's seed and the trial's number, so a resumed study draws what an uninterrupted one
    would have drawn for the same history. Random draws first: a third of the budget, 3 to 10 trials."""
    return optuna.samplers.TPESampler(seed=seed * 100_003 + number, n_startup_trials=min(10, max(3, trials // 3)))


def _open_study(cfg: Config, out_dir: Path, space: Space, storage: str | None, resume: bool, pruner: str) -> Any:
    task = infer_task(cfg)
    metric, higher = validation_metric(cfg, TASKS[task])
    steps = run_steps(cfg, count_examples(cfg, task)[0]) if pruner in ("halving", "hyperband") else None
    where = storage or str(out_dir / JOURNAL)
    name = out_dir.resolve().name
    existing = [s.study_name for s in optuna.get_all_study_summaries(open_storage(out_dir, storage))]
    if name in existing and not resume and storage is None:
        raise ConfigError(
            f"--output_dir '{out_dir}' holds a tune study: continue it with --resume auto (several processes may "
            "work on it), or choose another --output_dir"
        )
    study = optuna.create_study(
        storage=open_storage(out_dir, storage),
        study_name=name,
        direction="maximize" if higher else "minimize",
        pruner=make_pruner(pruner, steps),
        load_if_exists=True,
    )
    settings = {"metric": metric, "space": space, "config": _comparable(cfg), "pruner": pruner}
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", json.loads(json.dumps(settings)))
    elif saved != json.loads(json.dumps(settings)):
        differs = [k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k]))]
        raise ConfigError(
            f"the tune study in '{where}' was started with another {' and '.join(differs)}: run the same command "
            "(config, overrides, --space) to continue it, or choose another --output_dir"
        )
    return study


def _comparable(cfg: Config) -> dict[str, Any]:
    """The config that must match for a process to join a study (its output folder may differ)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "output_dir"}


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Search:
    """One tune process working on a study: takes over trials whose process died, then asks new ones until the
    study holds `trials` trials or `timeout_s` has passed."""

    def __init__(self, cfg: Config, out_dir: Path, study: Any, space: Space, seed: int, log: Callable) -> None:
        self.cfg, self.out, self.study, self.space, self.seed, self.log = cfg, out_dir, study, space, seed, log
        self.metric = study.user_attrs["settings"]["metric"]
        self.trials = 0
        """The study's number of trials (run's `trials`)."""
        (out_dir / "trials").mkdir(parents=True, exist_ok=True)

    def run(self, trials: int, timeout_s: float | None, resume: bool) -> None:
        self.trials = trials
        deadline = time.monotonic() + timeout_s if timeout_s else math.inf
        while time.monotonic() < deadline:
            with exclusive(self.out / ASK_LOCK):
                job = self._orphan() if resume else None
                if job is None:
                    if len(self.study.get_trials(deepcopy=False)) >= trials:
                        return
                    job = self._new_trial(trials)
            self._run(*job)
        self.log(f"--timeout: {timeout_s:g} s passed; no new trial starts")

    def _orphan(self) -> tuple | None:
        """A running trial whose tune process is gone (its trial lock is free): this process takes it over."""
        for frozen in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            lock = try_lock(self._lock_path(frozen.number), create=False)
            if lock is None:
                continue  # a live process holds it, or it belongs to another machine's folder
            run_dir = self.out / frozen.user_attrs["run_dir"]
            self.log(f"[trial {frozen.number}] its tune process ended midway: it {resume_point(run_dir)}")
            trial = optuna.trial.Trial(self.study, frozen._trial_id)  # the same trial, reported to from here on
            trial.set_user_attr("worker", _worker())
            return trial, frozen.user_attrs["overrides"], lock, frozen
        return None

    def _new_trial(self, trials: int) -> tuple:
        number = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = _sampler(self.seed, number, trials)
        trial = self.study.ask()
        params = suggest(trial, self.space)
        trial.set_user_attr("worker", _worker())
        trial.set_user_attr("run_dir", f"trials/trial_{trial.number:03d}")
        trial.set_user_attr("overrides", params)
        lock = try_lock(self._lock_path(trial.number))  # after the attributes: a locked trial always has them
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]} {_short(v)}" for k, v in params.items())
        self.log(f"[trial {trial.number}/{trials}] {shown}")
        return trial, params, lock, None

    def _lock_path(self, number: int) -> Path:
        return self.out / "trials" / f".trial_{number:03d}.lock"

    def _run(self, trial: Any, params: dict[str, Any], lock: int | None, earlier: Any) -> None:
        """Run (or, `earlier` being the trial as its dead process left it, resume) one trial and tell the study."""
        run_dir = self.out / "trials" / f"trial_{trial.number:03d}"
        resume = earlier is not None
        reported = set(earlier.intermediate_values) if resume else set()
        try:
            if resume and (run_dir / "summary.json").is_file():
                run = TrialRun("complete", summary=json.loads((run_dir / "summary.json").read_text()))
            else:
                if resume:
                    wait_for_run_lock(run_dir, self.log)
                cfg = trial_config(self.cfg, params, run_dir)
                log_file = self.out / "trials" / f"trial_{trial.number:03d}.log"
                started = resume and (run_dir / "config.yaml").is_file()  # else killed before its child began
                reporter = Reporter(trial, self.metric, reported, lambda: self._must_finish(trial.number))
                run = train_child(cfg, run_dir, log_file, reporter, started)
            self._tell(trial, run, earlier.user_attrs if resume else {})
        finally:
            if lock is not None:
                os.close(lock)
        write_results(self.cfg, self.out, self.study)

    def _must_finish(self, number: int) -> bool:
        """Whether trial `number` is the study's last and no trial has completed yet: it then runs whole."""
        if number < self.trials - 1:
            return False
        return not self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def _tell(self, trial: Any, run: TrialRun, earlier: dict[str, Any]) -> None:
        trial.set_user_attr("wall_time_s", earlier.get("wall_time_s", 0.0) + run.wall_time_s)
        if run.cpu_time_s is not None:
            trial.set_user_attr("cpu_time_s", (earlier.get("cpu_time_s") or 0.0) + run.cpu_time_s)
        peak = max(filter(None, (earlier.get("peak_rss_bytes"), run.peak_rss_bytes)), default=None)
        trial.set_user_attr("peak_rss_bytes", peak)
        n = trial.number
        if run.state == "interrupted":
            raise KeyboardInterrupt(f"tune stopped during trial {n}")
        if run.state == "pruned":
            trial.set_user_attr("pruned_at", run.pruned_at)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            first = not any(
                t.number != n and max(t.intermediate_values, default=-1) >= run.pruned_at
                for t in self.study.get_trials(deepcopy=False)
            )
            why = " (the first trial to get there: its value is the bar for the next ones)" if first else ""
            self.log(f"    pruned at step {run.pruned_at}{why} ({run.wall_time_s:.0f} s)")
        elif run.state == "failed":
            trial.set_user_attr("error", run.error)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.log(f"    failed: {run.error}")
            finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            if not self.study.get_trials(deepcopy=False, states=finished):  # likely the config: stop, say why
                raise TrainingError(f"trial {n} failed: {run.error} (log: {self.out}/trials/trial_{n:03d}.log)")
        else:
            value = run.summary["best_val"][self.metric]
            self.study.tell(trial, value)
            self.log(f"    val {self.metric} {value:.4f} ({run.wall_time_s:.0f} s)")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------- results


def study_record(study: Any) -> dict[str, Any]:
    """study.json: the metric, its direction, the best trial and every trial (tune.html draws this)."""
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "metric": study.user_attrs["settings"]["metric"],
        "direction": study.direction.name.lower(),
        "best": study.best_trial.number if complete else None,
        "trials": [
            {
                "number": t.number,
                "state": states[t.state.name],
                "value": t.value,
                "params": t.user_attrs.get("overrides", t.params),
                "run_dir": t.user_attrs.get("run_dir"),
                "wall_time_s": t.user_attrs.get("wall_time_s"),
                "cpu_time_s": t.user_attrs.get("cpu_time_s"),
                "pruned_at": t.user_attrs.get("pruned_at"),
                "intermediate": [[step, v] for step, v in sorted(t.intermediate_values.items())],
                "worker": t.user_attrs.get("worker"),
                "peak_rss_bytes": t.user_attrs.get("peak_rss_bytes"),
                "error": t.user_attrs.get("error"),
            }
            for t in study.get_trials(deepcopy=False)
        ],
    }


def best_config(cfg: Config, out_dir: Path, overrides: dict[str, Any]) -> Config:
    """The config of the best settings, trainable with `fulltune train --config` (into <output_dir>/best, test
    split read)."""
    return trial_config(cfg, overrides, out_dir / "best", read_test=True)


def write_results(cfg: Config, out_dir: Path, study: Any) -> dict[str, Any]:
    """study.json, tune.html and, once a trial completed, best_config.yaml (each replaced whole)."""
    record = study_record(study)
    write_atomic(out_dir / "study.json", json.dumps(record, indent=1) + "\n")
    write_tune_html(out_dir / "tune.html", record)
    if record["best"] is not None:
        overrides = study.best_trial.user_attrs["overrides"]
        tmp = out_dir / f".best_config.yaml.tmp-{os.getpid()}"
        save_config(best_config(cfg, out_dir, overrides), tmp)
        os.replace(tmp, out_dir / "best_config.yaml")
    return record


def run_study(
    cfg: Config,
    out_dir: Path,
    *,
    trials: int,
    timeout_s: float | None = None,
    space: dict | None = None,
    storage: str | None = None,
    seed: int = 0,
    resume: bool = False,
    log: Callable[[str], None] = print,
    pruner: str = "halving",
) -> StudyResult:
    """Search `space` (default: the method's, `default_space`) over `trials` trials of `cfg`, each a run folder in
    `out_dir`/trials; `resume` goes on with the study already in `out_dir` (or `storage`) and takes over trials
    whose process died. The test split is never read. Several processes may run this on one study."""
    require_optuna()
    out_dir = Path(out_dir)
    if trials < 1:
        raise ConfigError(f"--trials {trials}: expected at least 1")
    space = check_space(cfg, space if space is not None else default_space(cfg))
    claim_output(out_dir, "tune", run_inputs(cfg), entries=TUNE_ENTRIES)
    start = time.perf_counter()
    study = _open_study(cfg, out_dir, space, storage, resume or storage is not None, pruner)
    Search(cfg, out_dir, study, space, seed, log).run(trials, timeout_s, resume or storage is not None)
    record = write_results(cfg, out_dir, study)
    done = [t for t in record["trials"] if t["state"] == "complete"]
    best = next((t for t in done if t["number"] == record["best"]), None)
    peaks = [t["peak_rss_bytes"] for t in record["trials"] if t["peak_rss_bytes"]]
    return StudyResult(
        best_overrides=best["params"] if best else None,
        best_value=best["value"] if best else None,
        metric=record["metric"],
        direction=record["direction"],
        n_complete=len(done),
        n_pruned=sum(t["state"] == "pruned" for t in record["trials"]),
        wall_time_s=time.perf_counter() - start,
        peak_rss_bytes=max(peaks, default=None),
        best_run_dir=out_dir / best["run_dir"] if best else None,
    )


def run_final(
    cfg: Config, out_dir: Path, overrides: dict[str, Any], k: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train the best settings `k` times, seeds training.seed .. +k-1, each scored once on the test split:
    final.json with each run's numbers, their mean and standard deviation."""
    metric = validation_metric(cfg, TASKS[infer_task(cfg)])[0]
    runs = []
    for seed in range(cfg.training.seed, cfg.training.seed + k):
        run_dir = out_dir / "final" / f"seed_{seed}"
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            log(f"[final] seed {seed}: {run_dir}")
            c = trial_config(cfg, overrides | {"training.seed": seed}, run_dir, read_test=True)
            (out_dir / "final").mkdir(exist_ok=True)
            resume = run_dir.is_dir() and any(run_dir.iterdir())
            run = train_child(c, run_dir, out_dir / "final" / f"seed_{seed}.log", None, resume)
            if run.state != "complete":
                raise FulltuneError(f"the final run with seed {seed} {run.state}: {run.error} ({run_dir})")
            summary = run.summary
        test = (summary.get("test") or {}).get(metric)
        runs.append({"seed": seed, "run_dir": str(run_dir), "val": summary["best_val"][metric], "test": test})
        log(f"    test {metric} {test if test is None else format(test, '.4f')}")
    tests = [r["test"] for r in runs if r["test"] is not None]
    final = {
        "metric": metric,
        "runs": runs,
        "mean": statistics.fmean(tests) if tests else None,
        "std": statistics.stdev(tests) if len(tests) > 1 else None,
    }
    write_atomic(out_dir / "final.json", json.dumps(final, indent=1) + "\n")
    return final
