"""What `fulltune tune`'s pruning saves, and whether its search finds what a hand-run grid finds, on one budget.

For one data set (MiniLM, full fine-tuning, one epoch, the same budget for every run) it runs, one after the other:

  tune      `fulltune tune --trials N` (TPE, successive halving on the validation metric at each evaluation)
  unpruned  the same N trials without pruning: a trial tune completed ran unpruned already (its time counts as it
            is); each pruned one is trained to the end from its own config.yaml (the settings TPE drew) by
            `fulltune train`, started the way tune starts its trials (runtime/children.py)
  grid      `fulltune train` at five learning rates (2e-5, 5e-5, 1e-4, 2e-4, 5e-4), the rest at the defaults

and prints the best validation metric of the search and of the grid, and the trials' total time with pruning against
the same trials unpruned (wall seconds of each trial's process, start-up included; the CPU seconds too, which other
jobs on the machine disturb less). The test split is never read.

    python bench/tune_pruning.py --data sst2 --out /tmp/tp_sst2     # 5,000 SST-2 rows, SST-2 dev as validation
    python bench/tune_pruning.py --data trec --out /tmp/tp_trec     # TREC, split into train/val by fulltune
    python bench/tune_pruning.py --data ag_news --eval-rows 500 --out /tmp/tp_ag
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GRID = ("2e-5", "5e-5", "1e-4", "2e-4", "5e-4")


def data_args(name: str, rows: int) -> list[str]:
    """The data part of the command line: SST-2 (`rows` of train, dev as validation), TREC (coarse labels) or the
    AG News subset (10% held out as validation by fulltune, `rows` of the rest)."""
    if name == "sst2":
        files = ["--train_file", str(DATA / "sst2" / "train.tsv"), "--val_file", str(DATA / "sst2" / "dev.tsv")]
        return [*files, "data.text_column=sentence", "data.label_column=label", f"data.max_samples={rows}"]
    if name == "ag_news":
        return ["--data_dir", str(DATA / "ag_news"), f"data.max_samples={rows}"]
    trec = ["--data_dir", str(DATA / "trec"), "data.text_column=text", "data.label_column=coarse_label"]
    return [*trec, f"data.max_samples={rows}"]


def budget(args: argparse.Namespace) -> list[str]:
    """What every run shares: the model, one epoch, looks every `eval_every` steps, no checkpoint files kept."""
    return [
        "--model",
        "minilm",
        *data_args(args.data, args.rows),
        *([f"data.max_eval_samples={args.eval_rows}"] if args.eval_rows else []),
        f"data.max_length={args.max_length}",
        f"training.num_epochs={args.epochs}",
        f"training.eval_every_steps={args.eval_every}",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "checkpoint.save_every_epochs=0",
        "checkpoint.save_best=false",
        "training.seed=0",
    ]


def best_val(run_dir: Path) -> float | None:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = next(k for k in summary["best_val"] if k != "step")
    return float(summary["best_val"][metric])


def train(argv: list[str], run_dir: Path) -> dict[str, float | None]:
    """One `fulltune train` run, started as tune starts a trial; its wall and CPU seconds and best val metric."""
    from fulltune.runtime.children import Child

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    child = Child(["train", *argv, f"output_dir={run_dir}"], log)
    if child.wait() != 0:
        raise SystemExit(f"{run_dir}: fulltune train exited {child.returncode} (see {log})")
    return {"wall_s": time.perf_counter() - start, "cpu_s": child.cpu_s, "val": best_val(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("sst2", "trec", "ag_news"), default="sst2")
    parser.add_argument("--eval-rows", type=int, help="validation rows (default: all)")
    parser.add_argument("--rows", type=int, default=5000, help="training rows (the first ones)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--parts", default="tune,unpruned,grid")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    parts = args.parts.split(",")
    out, results = args.out, {}
    out.mkdir(parents=True, exist_ok=True)
    base = budget(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if "tune" in parts:
        cmd = [sys.executable, "-m", "fulltune", "tune", *base, "--output_dir", str(out / "tune")]
        cmd += ["--trials", str(args.trials), "--resume", "auto"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=open(out / "tune.log", "w"), stderr=subprocess.STDOUT)
        results["tune_process_wall_s"] = time.perf_counter() - start
    study = json.loads((out / "tune" / "study.json").read_text())
    trials = study["trials"]
    keys = ("number", "state", "value", "wall_time_s", "cpu_time_s", "pruned_at")
    results["tune"] = [{k: t.get(k) for k in keys} for t in trials]
    if "unpruned" in parts:
        results["unpruned"] = [
            train(["--config", str(out / "tune" / t["run_dir"] / "config.yaml")], out / "unpruned" / t["run_dir"])
            if t["state"] == "pruned"
            else {"wall_s": t["wall_time_s"], "cpu_s": t.get("cpu_time_s"), "val": t["value"]}
            for t in trials
        ]
    if "grid" in parts:
        results["grid"] = {
            lr: train([*base, f"training.base_learning_rate={lr}", "data.read_test=false"], out / "grid" / f"lr{lr}")
            for lr in GRID
        }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report(results)


def report(results: dict) -> None:
    tune = results["tune"]
    pruned_s = sum(t["wall_time_s"] or 0 for t in tune)
    pruned_cpu = sum(t["cpu_time_s"] or 0 for t in tune)
    best = max(t["value"] for t in tune if t["state"] == "complete")
    states = [t["state"] for t in tune]
    print(f"tune: {states.count('complete')} complete, {states.count('pruned')} pruned; best val {best:.4f}")
    print(f"trials' total time with pruning: wall {pruned_s:.0f} s, CPU {pruned_cpu:.0f} s")
    if "unpruned" in results:
        un = results["unpruned"]
        un_s, un_cpu = sum(r["wall_s"] for r in un), sum(r["cpu_s"] or 0 for r in un)
        print(
            f"the same trials unpruned: wall {un_s:.0f} s, CPU {un_cpu:.0f} s; best val {max(r['val'] for r in un):.4f}"
        )
        saved_cpu = 100 * (1 - pruned_cpu / un_cpu) if un_cpu else float("nan")
        print(f"pruning saved {100 * (1 - pruned_s / un_s):.1f}% of the wall time, {saved_cpu:.1f}% of the CPU time")
    if "grid" in results:
        g = results["grid"]
        lr = max(g, key=lambda k: g[k]["val"])
        each = ", ".join(f"{k}: {v['val']:.4f}" for k, v in g.items())
        print(f"grid best val {g[lr]['val']:.4f} at lr {lr} ({each})")
        print(f"tune best - grid best: {100 * (best - g[lr]['val']):+.2f} points")


if __name__ == "__main__":
    main()
