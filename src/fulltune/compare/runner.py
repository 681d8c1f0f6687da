"""`fulltune compare`: one config trained under several methods with the same data, seed and budget, each as a
normal run folder (<output_dir>/<method>/) in its own process, so that peak memory and wall time are per method.
With --seeds K or --tune N, a method's folder holds its search (tune/) and one run per seed (seed_<seed>/), and its
row their statistics (`fulltune.compare.seeds`). Writes comparison.md, comparison.json, comparison.png and
comparison.html beside them.

A method that fails is reported as failed with its one-line error; the others still run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fulltune.compare.seeds import SEARCH_FOLDER, seed_folder, seed_row
from fulltune.compare.table import num, test_cell
from fulltune.compare.variants import (
    UNTRAINED,
    VARIANT_METHODS,
    parse_variants,
    test_top5,
    untrained_row,
    variant,
)
from fulltune.config import Config, load_config, save_config, to_dict
from fulltune.config.methods import DEFAULT_LR_MULT
from fulltune.config.yamlfile import read_yaml
from fulltune.data.text import run_inputs
from fulltune.errors import ConfigError, FulltuneError
from fulltune.files.rundir import claim_output_dir, release_run_lock
from fulltune.report.html import read_jsonl
from fulltune.runtime.children import Child
from fulltune.runtime.device import resolve_device, resolve_precision
from fulltune.tune.trial import error_line

# Learning rate of each method as a multiple of training.base_learning_rate (read as full fine-tuning's LR).


def parse_methods(text: str) -> list[str]:
    """The method variants typed (`full,lora:r=8,lora:r=16,qlora`), checked, duplicates dropped."""
    return [v.spec for v in parse_variants(text)]


def learning_rates(text: str, methods: list[str], base_lr: float) -> dict[str, float]:
    """Per-variant LR: the defaults (multiples of base_lr), then `method=LR` or `method=xN` entries of `text` (a
    method name sets each of its variants; a variant's label, lora-r16, sets that one)."""
    lrs = {m: base_lr * DEFAULT_LR_MULT[variant(m).method] for m in methods}
    labels = {variant(m).label: m for m in methods}
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, value = item.partition("=")
        method = method.strip()
        if method not in VARIANT_METHODS and method not in labels:
            raise ConfigError(
                f"--lr_per_method '{item}': unknown method '{method}'; choose from {', '.join(VARIANT_METHODS)}"
            )
        value = value.strip()
        relative = value.startswith("x")
        try:
            number = float(value[1:] if relative else value) * (base_lr if relative else 1.0)
        except ValueError:
            raise ConfigError(f"--lr_per_method '{item}': expected method=LR or method=xN, e.g. lora=1e-3") from None
        if not number > 0:
            raise ConfigError(f"--lr_per_method '{item}': the learning rate must be > 0")
        for m in methods:
            if m == method or variant(m).method == method or variant(m).label == method:
                lrs[m] = number
    return lrs


def method_config(
    config: str | None,
    overrides: list[str],
    root: Path,
    method: str,
    lr: float,
    extra: tuple[str, ...] = (),
    run_dir: Path | None = None,
) -> Config:
    """The shared config with only what differs between methods changed: name (and a variant's options), learning
    rate, run folder (the variant's label: lora-r8, or `run_dir`); then `extra` (a search's best settings, a seed),
    which win over the rest."""
    v = variant(method)
    return load_config(
        config,
        overrides
        + [
            f"method.name={v.method}",
            *v.overrides,
            f"training.base_learning_rate={lr!r}",
            f"output_dir={json.dumps(str(run_dir or root / v.label))}",
            "logging.progress_bar=false",  # the child writes to a log file, where a live bar is noise
            *extra,
        ],
    )


# ------------------------------------------------------------------------------------------------- one method


def folder_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path`, leaving out the top-level subfolders named in `skip`."""
    total = 0
    for f in path.rglob("*"):
        if f.is_file() and f.relative_to(path).parts[0] not in skip:
            total += f.stat().st_size
    return total


def _reusable(run_dir: Path, cfg: Config) -> bool:
    try:
        saved = read_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"), str(run_dir / "config.yaml"))
    except (OSError, yaml.YAMLError, ConfigError):
        return False
    return (run_dir / "summary.json").is_file() and saved == to_dict(cfg)


def run_method(cfg: Config, skip_done: bool = False) -> dict[str, Any]:
    """Train `cfg` in a child `fulltune train` process (runtime/children.py); return its row of the comparison."""
    run_dir = Path(cfg.output_dir)
    row: dict[str, Any] = {
        "method": cfg.method.name,
        "learning_rate": cfg.training.base_learning_rate,
        "run_dir": str(run_dir),
        "status": "ok",
        "error": None,
        "peak_rss_bytes": None,
    }
    if skip_done and _reusable(run_dir, cfg):
        row["reused"] = True
        return row | _from_summary(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        # Never delete a folder this invocation did not create: it may hold a finished run and its checkpoints.
        what = "an earlier run" if (run_dir / "config.yaml").is_file() else "files that are not a fulltune run"
        return row | {
            "status": "failed",
            "error": f"'{run_dir}' already holds {what} (left untouched): give compare "
            "a new --output_dir, pass --skip_done to reuse finished runs, or remove the folder yourself",
        }
    claim_output_dir(run_dir, None, inputs=run_inputs(cfg))  # a train run's folder from its first file on
    release_run_lock(run_dir)  # the training process takes it
    save_config(cfg, run_dir / "config.yaml")
    log = run_dir / "compare.log"
    start = time.perf_counter()
    child = Child(["train", "--config", str(run_dir / "config.yaml")], log)
    try:
        child.wait()
    except KeyboardInterrupt:
        child.wait()  # the child got the same SIGINT; let it finish its own clean-up first
        raise
    row["peak_rss_bytes"] = child.peak_rss_bytes
    row["process_wall_time_s"] = time.perf_counter() - start
    if child.returncode != 0:
        return row | {"status": "failed", "error": error_line(log)}
    if not (run_dir / "summary.json").is_file():
        return row | {"status": "failed", "error": "the run ended without writing summary.json"}
    return row | _from_summary(run_dir)


def _from_summary(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = next(k for k in summary["best_val"] if k != "step")
    export = run_dir / "best" if (run_dir / "best").is_dir() else Path(summary.get("last_checkpoint") or run_dir)
    adapter = export / "adapter"
    total = summary["total_parameters"]
    samples_per_s = summary.get("train_samples_per_s") or summary.get("samples_per_s_median")
    history = read_jsonl(run_dir / "run_history.jsonl")
    tokens_per_sample = history[-1].get("tokens_per_sample") if history else None  # a causal LM's seq_len
    return {
        "metric": metric,
        "val": summary["best_val"][metric],
        "test": (summary.get("test") or {}).get(metric),
        "test_weights": (summary.get("test") or {}).get("weights"),
        "test_examples": (summary.get("test") or {}).get("examples"),  # 'best' (picked on val) or 'final'
        "test_top5": test_top5(run_dir),
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": total,
        "trainable_percent": 100.0 * summary["trainable_parameters"] / total if total else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "wall_time_s": summary.get("wall_time_s"),
        # Optimisation-only throughput (evaluation and saving excluded) where train.py reports it.
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample if samples_per_s and tokens_per_sample else None,
        "optimizer_steps": summary.get("optimizer_steps"),
        "export_dir": str(export),
        # The export a user ships: weights, config, tokenizer or image processor (not the resume state).
        "exported_bytes": folder_bytes(export, skip=("training_state", "adapter")),
        "adapter_bytes": folder_bytes(adapter) if adapter.is_dir() else None,
    }


def settings_of(cfg: Config, methods: list[str], lrs: dict[str, float]) -> dict[str, Any]:
    d, t = cfg.data, cfg.training
    device = resolve_device(cfg.hardware.device)
    data = d.data_dir or d.train_file or "?"
    return {
        "model": cfg.model.describe(),
        "pretrained": not cfg.model.tiny_config,
        "data": data + (f" ({d.max_samples} train examples at most, drawn with the seed)" if d.max_samples else ""),
        "budget": f"{t.num_epochs} epoch{'s' if t.num_epochs != 1 else ''}"
        + (f", at most {t.max_steps} steps" if t.max_steps else ""),
        "global_batch": d.batch_size * t.gradient_accumulation_steps,
        "length": f"max_length {d.max_length}" if cfg.task != "causal_lm" else f"seq_len {d.seq_len}",
        "seed": t.seed,
        "precision": resolve_precision(cfg.hardware.mixed_precision, device).name,
        "device": str(device) + (f" ({os.cpu_count()} CPU cores)" if device.type == "cpu" else ""),
        "methods": methods,
        "learning_rates": lrs,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------------- all methods


Search = Callable[..., Any]
"""`fulltune.tune.study.run_study(cfg, out_dir, trials=N, seed=S, resume=..., log=...)`, returning a StudyResult
(best_overrides, best_value, metric, direction, n_complete, n_pruned, wall_time_s, peak_rss_bytes, best_run_dir)."""


@dataclass(frozen=True)
class Repeats:
    """How often each method runs: its seeds (the same for every method) and, with --tune, a search of `trials`
    trials before them."""

    seeds: list[int]
    search: Search | None = None
    trials: int = 0

    @property
    def nested(self) -> bool:
        """Whether a method's folder holds seed_<seed>/ runs (and tune/) rather than being the run itself."""
        return len(self.seeds) > 1 or self.search is not None


def _search(repeats: Repeats, cfg: Config, out_dir: Path, skip_done: bool) -> dict[str, Any]:
    """The method's search into `out_dir` (its trials are ordinary run folders there); the row's facts of it."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not skip_done:
        raise ConfigError(
            f"'{out_dir}' already holds a search (left untouched): pass --skip_done to continue it, or give "
            "compare a new --output_dir"
        )
    assert repeats.search is not None
    study = repeats.search(
        cfg,
        out_dir,
        trials=repeats.trials,
        seed=cfg.training.seed,
        resume=skip_done,  # go on with the search already there: its finished trials are kept
        log=lambda line: print(f"    {line}", flush=True),
    )
    print(f"    search: best {study.metric} {study.best_value} with {study.best_overrides}", flush=True)
    return {
        "search_trials": repeats.trials,
        "search_complete": study.n_complete,
        "search_pruned": study.n_pruned,
        "search_wall_time_s": study.wall_time_s,
        "search_peak_rss_bytes": study.peak_rss_bytes,
        "search_metric": study.metric,
        "search_best_value": study.best_value,
        "best_overrides": dict(study.best_overrides or {}),  # no finished trial: the method's own settings
        "search_dir": str(out_dir),
        "search_best_run_dir": str(study.best_run_dir) if study.best_run_dir else None,
    }


def run_variant(
    config: str | None,
    overrides: list[str],
    root: Path,
    method: str,
    lr: float,
    skip_done: bool = False,
    repeats: Repeats | None = None,
) -> dict[str, Any]:
    """One method's row. One seed and no search: its run in <root>/<label>/. Else its search first (--tune, in
    <root>/<label>/tune/), then one run per seed in <root>/<label>/seed_<seed>/ at the settings found, and the row
    of their statistics."""
    if repeats is None or not repeats.nested:
        return run_method(method_config(config, overrides, root, method, lr), skip_done)
    label = variant(method).label
    method_dir = root / label
    if (method_dir / "config.yaml").is_file():  # a one-seed run: never mix seed folders into it
        raise ConfigError(
            f"'{method_dir}' holds a one-seed run (left untouched); with --seeds or --tune each seed runs in "
            f"{method_dir}/seed_<seed>/: give compare a new --output_dir"
        )
    search = None
    if repeats.search is not None:
        cfg = method_config(config, overrides, root, method, lr, run_dir=method_dir / SEARCH_FOLDER)
        search = _search(repeats, cfg, method_dir / SEARCH_FOLDER, skip_done)
    extra = tuple(f"{k}={json.dumps(v)}" for k, v in (search or {}).get("best_overrides", {}).items())
    runs = []
    for seed in repeats.seeds:
        run_dir = seed_folder(method_dir, seed)
        cfg = method_config(config, overrides, root, method, lr, (*extra, f"training.seed={seed}"), run_dir)
        runs.append(run_method(cfg, skip_done) | {"seed": seed})
        print(f"    seed {seed}: {_outcome(runs[-1])}", flush=True)
    return seed_row(label, runs, search)


def _outcome(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"failed: {row['error']}"
    test = test_cell(row, ".4f")
    return f"{row['metric']}: val {num(row['val'], '.4f')}, test {test}, wall {num(row['wall_time_s'], '.0f')} s"


def run_all(
    config: str | None,
    overrides: list[str],
    root: Path,
    methods: list[str],
    lrs: dict[str, float],
    skip_done: bool = False,
    repeats: Repeats | None = None,
) -> list[dict[str, Any]]:
    """The untrained model's row, then every method in turn (each in its own process and run folder, one per seed
    with `repeats`); a failing one is reported as failed."""
    rows = []
    print(f"[0/{len(methods)}] {UNTRAINED}: evaluating the model before any training", flush=True)
    try:  # the model as every run starts it: method full (nothing is trained, so nothing is wrapped or frozen)
        untrained = load_config(
            config, overrides + ["method.name=full", f"output_dir={json.dumps(str(root / 'untrained'))}"]
        )
        rows.append(untrained_row(untrained))
    except (ConfigError, RuntimeError, ValueError) as err:
        print(f"    no {UNTRAINED} row: {str(err).splitlines()[0]}", flush=True)
    for i, method in enumerate(methods, start=1):
        label = variant(method).label
        log = root / label / ("seed_*/compare.log" if repeats and repeats.nested else "compare.log")
        searched = f", searched first in {root / label / SEARCH_FOLDER}" if repeats and repeats.search else ""
        print(f"[{i}/{len(methods)}] {method}: lr {lrs[method]:.3g}{searched}, log {log}", flush=True)
        try:
            row = run_variant(config, overrides, root, method, lrs[method], skip_done, repeats)
        except FulltuneError as err:  # a config only this method rejects, a failed search; the others still run
            row = {
                "method": method,
                "learning_rate": lrs[method],
                "run_dir": str(root / label),
                "status": "failed",
                "error": str(err),
            }
        row["method"] = label  # lora-r8 and lora-r16 are two rows
        rows.append(row)
        print(f"    {_outcome(row)}", flush=True)
    return rows
