"""`fulltune tune`: search the learning rate and other settings with Optuna, each trial a run folder trained in its
own process (the search is `fulltune.tune.study`); `--final K` then trains the best settings over K seeds and scores
each once on the test split."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fulltune.cli.flags import add_config_flags, flag_overrides

# Flags that stand for config keys, as in `fulltune train`; --output_dir is the search's own.
DATA_FLAGS = ("data_dir", "train_file", "val_file", "test_file", "model", "task", "method")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search the learning rate and other settings (Optuna: TPE, early stopping of trailing trials)",
        description="Each trial trains in its own process into <output_dir>/trials/trial_NNN (an ordinary, resumable "
        "run folder) and never reads the test split. Writes study.json and best_config.yaml (train it with "
        "`fulltune train --config`). The study lives in <output_dir>/study.journal: a killed search goes on with "
        "--resume auto, and several processes may work on it (each with --resume auto, or the same --storage).",
    )
    add_config_flags(p, DATA_FLAGS, overrides=False)
    p.add_argument("--output_dir", help="folder of the search (default: the config's output_dir)")
    p.add_argument("--trials", type=int, default=20, help="trials in the study, over all its processes")
    p.add_argument("--timeout", type=float, help="seconds after which this process starts no new trial")
    p.add_argument(
        "--space",
        help="YAML file of `key: {low: L, high: H, log: true}`, `key: [choice, ...]` or `key: value` over config "
        "keys, replacing the default space (the method's learning-rate range, warmup ratio, weight decay, and "
        "layer-wise decay or LoRA's rank and alpha)",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage shared by several processes or machines: a database URL (sqlite:///f.db, "
        "postgresql://...) or a journal file path (default: <output_dir>/study.journal)",
    )
    p.add_argument("--resume", choices=["auto"], help="go on with the study in the output folder")
    p.add_argument("--pruner", choices=["halving", "hyperband", "none"], default="halving", help="early stopping")
    p.add_argument("--final", type=int, default=0, metavar="K", help="then train the best settings with K seeds")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every trial, e.g. training.num_epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.cli.options import require_training_data
    from fulltune.config import load_config
    from fulltune.tune.space import read_space
    from fulltune.tune.study import run_final, run_study

    cfg = load_config(args.config, flag_overrides(args, DATA_FLAGS) + list(args.overrides or []))
    require_training_data(cfg)
    out = Path(args.output_dir or cfg.output_dir)
    space = read_space(Path(args.space), cfg) if args.space else None
    result = run_study(
        cfg,
        out,
        trials=args.trials,
        timeout_s=args.timeout,
        space=space,
        storage=args.storage,
        seed=cfg.training.seed,
        resume=args.resume == "auto",
        log=lambda line: print(line, flush=True),
        pruner=args.pruner,
    )
    print(
        f"{result.n_complete} complete, {result.n_pruned} pruned in {result.wall_time_s:.0f} s; "
        + (
            f"best val {result.metric} {result.best_value:.4f} ({result.best_run_dir})"
            if result.best_overrides is not None
            else "no trial completed"
        ),
        flush=True,
    )
    if result.best_overrides is None:
        return 1
    print(f"written: {out}/study.json, best_config.yaml", flush=True)
    if args.final > 0:
        final = run_final(cfg, out, result.best_overrides, args.final, log=lambda line: print(line, flush=True))
        std = f" ± {final['std']:.4f}" if final["std"] is not None else ""
        mean = "—" if final["mean"] is None else f"{final['mean']:.4f}"
        print(f"final: test {final['metric']} {mean}{std} over {args.final} seeds; written: {out}/final.json")
    return 0
