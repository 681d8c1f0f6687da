"""`fulltune compare`: train one config under several methods (same data, seed and budget), each in its own
process and run folder, optionally over several seeds and after a search of each method's settings, and tabulate
them (the runs are `fulltune.compare.runner`, the statistics `.seeds`, the tables `.table`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fulltune.cli.flags import add_config_flags, flag_overrides
from fulltune.config.methods import DEFAULT_LR_MULT, METHODS, VARIANT_METHODS

# Flags that stand for config keys, as in `fulltune train`; --output_dir is the comparison's own.
DATA_FLAGS = ("data_dir", "train_file", "val_file", "test_file", "model", "task")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train one config under several methods (same data, seed, budget) and tabulate them",
        description="Each method runs `fulltune train` in its own process into <output_dir>/<method>/; the table "
        "goes to <output_dir>/comparison.{md,json,png}. Exit status 1 when a method failed.",
    )
    add_config_flags(p, DATA_FLAGS, overrides=False)
    p.add_argument("--output_dir", help="folder of the comparison (default: the config's output_dir)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(VARIANT_METHODS)}; variants as METHOD:key=value[;...], "
        "e.g. full,lora:r=8,lora:r=16,qlora (each variant its own run folder: lora-r8); for CLIP also "
        "zero_shot, full_zs_head, lp_ft, wise_ft",
    )
    p.add_argument(
        "--lr_per_method",
        default="",
        help="e.g. lora=1e-3,linear_probe=x20 (absolute, or xN times training.base_learning_rate); default: "
        + ", ".join(f"{m} x{v:g}" for m, v in DEFAULT_LR_MULT.items()),
    )
    p.add_argument(
        "--skip_done",
        action="store_true",
        help="reuse a method's finished run (summary.json) when its config is unchanged",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="K",
        help="train each method K times, training.seed = seed + 0..K-1 (the same seeds for every method), each "
        "in <output_dir>/<method>/seed_<seed>/; the table gives the test metric's mean ± sd, its 95%% interval and "
        "the paired difference to full fine-tuning",
    )
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="search each method's settings first: N trials of `fulltune tune` over its own default space (the "
        "same budget for every method, in <output_dir>/<method>/tune/), then its seeds at the best settings found",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides for every method, e.g. training.num_epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.compare.clip_rows import clip_notes, run_clip_rows, split_clip_rows
    from fulltune.compare.runner import Repeats, learning_rates, parse_methods, run_all, settings_of
    from fulltune.compare.seeds import seed_values
    from fulltune.compare.table import write_comparison
    from fulltune.compare.variants import num_classes, variant
    from fulltune.config import load_config
    from fulltune.data.text import run_inputs
    from fulltune.errors import ConfigError
    from fulltune.files.rundir import claim_output

    if args.seeds < 1 or args.tune < 0:
        raise ConfigError(f"--seeds {args.seeds} --tune {args.tune}: expected --seeds >= 1 and --tune >= 0")

    rest, clip_rows = split_clip_rows(args.methods)
    methods = parse_methods(rest) if rest or not clip_rows else []
    overrides = flag_overrides(args, DATA_FLAGS) + list(args.overrides or [])  # key=value wins over flags
    base = load_config(args.config, overrides)  # a bad config fails here, before any run starts
    root = Path(args.output_dir or base.output_dir)
    lrs = learning_rates(args.lr_per_method, methods, base.training.base_learning_rate)
    labels = [variant(m).label for m in methods] + clip_rows
    claim_output(root, "compare", run_inputs(base), entries=["comparison.*", *labels])
    repeats = Repeats(seed_values(base.training.seed, args.seeds), _search() if args.tune else None, args.tune)
    rows = run_all(args.config, overrides, root, methods, lrs, args.skip_done, repeats)
    full_lr = learning_rates(args.lr_per_method, ["full"], base.training.base_learning_rate)["full"]
    rows += run_clip_rows(args.config, overrides, args.skip_done, root, clip_rows, full_lr, rows)
    settings = settings_of(base, methods + clip_rows, lrs) | {
        "num_classes": num_classes(rows),
        "seeds": repeats.seeds,
        "tune_trials": args.tune or None,
    }
    table = write_comparison(root, settings, rows, clip_notes(rows))
    print(table + f"written: {root}/comparison.md, comparison.json, comparison.png, comparison.html")
    return 0 if all(r["status"] == "ok" and not r.get("seed_errors") for r in rows) else 1


def _search() -> Any:
    """`fulltune tune`'s search (`run_study`), loaded only for --tune: it needs the tune extra (Optuna)."""
    from fulltune.tune.study import require_optuna, run_study

    require_optuna()  # before any run starts
    return run_study
