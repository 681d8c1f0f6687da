"""`fulltune plan`: estimate the peak memory of each method for a config, check the estimates with a 2-step dry
run where they fit, and recommend a method, micro-batch and accumulation (the machinery is `fulltune.planning`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fulltune.cli.flags import add_config_flags, config_from_args
from fulltune.config.methods import METHODS
from fulltune.errors import ConfigError
from fulltune.units import human_bytes as human
from fulltune.units import parse_memory


def format_report(r: dict[str, Any]) -> str:
    examples = f"{r['examples']:,}" if r["examples"] is not None else "unknown"
    lines = [
        f"fulltune plan: {r['model']} | {r['task']} | {r['device']}, {r['precision']} | micro-batch "
        f"{r['micro_batch']} x {r['tokens']} tokens, accumulation {r['accumulation']}",
        f"training examples: {examples} ({r['examples_source']}) | budget {human(r['budget'])} ({r['budget_source']})",
        "",
        f"{'method':<13}{'trainable':>12}"
        + "".join(f"{h:>12}" for h in ("weights", "grads", "optimizer", "activations", "estimate", "measured"))
        + "  fits  fwd  s/step",
    ]
    for m in r["methods"]:
        if "error" in m:
            lines.append(f"{m['method']:<13}  {m['error']}")
            continue
        cells = "".join(
            f"{human(m[k]):>12}" for k in ("weights", "gradients", "optimizer", "activations", "peak", "measured")
        )
        step = f"{m['step_seconds']:.2f}" if m["step_seconds"] else "-"
        lines.append(
            f"{m['method']:<13}{m['trainable']:>12,}{cells}{'yes' if m['fits'] else 'no':>6}"
            f"{m['forward_passes']:>5.1f}{step:>8}"
        )
    rec = r["recommendation"]
    lines += [
        "",
        "estimate = weights + optimizer + max(activations, grads) (both when accumulating) + a few MiB of "
        f"buffers; measured = 2-step dry run on random inputs ({r['measured_how']}); neither counts the process "
        "itself (Python and the libraries: ~0.4 GiB on CPU); fwd = compute per step in forward passes",
        *sorted({m["note"] for m in r["methods"] if m.get("note")}),
        *r["precision_notes"],
        "",
        "recommendation: "
        + (
            f"method.name={rec['method']} data.batch_size={rec['micro_batch']} "
            f"training.gradient_accumulation_steps={rec['accumulation']}"
            + (" training.gradient_checkpointing=true" if rec["gradient_checkpointing"] else "")
            if rec["method"]
            else "none fits"
        ),
        *(f"  - {reason}" for reason in rec["reasons"]),
        *search_cost(r),
    ]
    return "\n".join(lines)


def search_cost(r: dict[str, Any]) -> list[str]:
    """One line: what `fulltune tune` costs, from the recommended method's measured s/step and the steps of a run."""
    rec = next((m for m in r["methods"] if m.get("method") == r["recommendation"]["method"]), None)
    if rec is None or not rec.get("step_seconds") or not r.get("steps_per_run"):
        return []
    run_s = rec["step_seconds"] * r["steps_per_run"]
    return [
        f"search: `fulltune tune --trials N` costs up to N x {run_s / 60:.1f} min ({r['steps_per_run']:,} steps x "
        f"{rec['step_seconds']:.2f} s/step, plus evaluations and start-up), less what pruning stops early"
    ]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="estimate memory per method, check it with a dry run, recommend one")
    add_config_flags(p, ("data_dir", "train_file", "val_file", "model", "task"), overrides=False)
    p.add_argument("--memory_budget", help="memory to fit in, e.g. 24GB or 16GiB (default: the device's free memory)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="plan for this device (sets hardware.device)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--no_dry_run", action="store_true", help="estimates only, no 2-step measurement")
    p.add_argument(
        "--performance",
        choices=("enough", "best"),
        help="what matters more: a good enough result (LoRA) or the best result (full)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.planning import plan

    cfg = config_from_args(
        args,
        ("data_dir", "train_file", "val_file", "model", "task"),
        [f"hardware.device={args.device}"] if args.device else [],
    )
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"--methods '{args.methods}': expected a comma-separated subset of {', '.join(METHODS)}")
    budget = parse_memory(args.memory_budget) if args.memory_budget else None
    log = None if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    report = plan(cfg, budget, methods, calibrate=not args.no_dry_run, log=log, performance=args.performance)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
