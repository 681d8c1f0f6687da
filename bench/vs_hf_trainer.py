"""fulltune vs Hugging Face's Trainer on the same job, in one invocation (`make bench`).

The job: full fine-tuning of all-MiniLM-L6-v2 on the first 2,048 rows of SST-2 train, max length 64, batch 32,
lr 1e-4, 1 epoch, then accuracy on SST-2 dev. Three lines, run alternately, each in its own process (so peak
memory is per line), several repeats; medians and the ratio fulltune / Trainer are printed.

  trainer_default  Trainer with its defaults (dynamic padding via DataCollatorWithPadding)
  trainer_best     Trainer with its best equivalent flags (bf16, adamw_torch_fused, group_by_length sampling)
  trainer_best_fp32  the same without bf16: on a CPU without bf16 units (AVX2 only) bf16 autocast is emulated and
                   about 10x slower, so there this is Trainer's real best
  fulltune         fulltune with its defaults
  fulltune_fp32    fulltune without bf16 (what it picks on a CPU without bf16 units): on a CPU with bf16 units,
                   `--lines trainer_best_fp32,fulltune_fp32` shows the fp32 pair that an AVX2 machine would run

The machine decides which Trainer lines are fair (`runtime.cpu_has_fast_bf16`): where the CPU has bf16 units
(AVX512-BF16 / AMX) Trainer's best is trainer_best (bf16); where bf16 is emulated (AVX2 only) it is
trainer_best_fp32, and trainer_best runs for one seed only, to show what bf16 costs there. The table is printed
under the CPU's kind and model name.

Throughput is training samples per second of the optimisation loop (tokenisation, model loading and the dev
evaluation excluded for every line). Peak memory is the process's peak RSS.

    python bench/vs_hf_trainer.py [--seeds 1,2,3] [--rows 2048] [--lines trainer_default,...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
LINES = ("trainer_default", "trainer_best", "trainer_best_fp32", "fulltune", "fulltune_fp32")


def read_tsv(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r["sentence"].strip() for r in rows], [int(r["label"]) for r in rows]


def peak_rss_mb() -> float:
    from fulltune.runtime.memory import maxrss_bytes

    return maxrss_bytes() / 2**20


def run_trainer(best: bool, seed: int, rows: int, workdir: Path, bf16: bool = True) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from fulltune.model.bundle import packaged_minilm_path

    path = str(packaged_minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = read_tsv(SST2 / "train.tsv", rows)
    dev_texts, dev_labels = read_tsv(SST2 / "dev.tsv")
    enc = tok(texts, truncation=True, max_length=64)
    train_set = [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(texts))]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    extra = {"bf16": bf16, "optim": "adamw_torch_fused", "train_sampling_strategy": "group_by_length"} if best else {}
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=32,
        learning_rate=1e-4,
        num_train_epochs=1,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=best and bf16):
        for i in range(0, len(dev_texts), 64):
            batch = tok(dev_texts[i : i + 64], truncation=True, max_length=64, padding=True, return_tensors="pt")
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == torch.tensor(dev_labels[i : i + 64])).sum())
    return {"samples_per_s": rows / train_time, "train_time_s": train_time, "dev_accuracy": correct / len(dev_texts)}


def run_fulltune(seed: int, rows: int, workdir: Path, precision: str = "auto") -> dict:
    from fulltune.speed.threads import prepare_openmp

    prepare_openmp()  # as the command and the Python API do, before torch loads
    from fulltune.config import load_config
    from fulltune.training.trainer import train

    train_file = workdir / "train.tsv"
    with open(SST2 / "train.tsv", encoding="utf-8") as src, open(train_file, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    cfg = load_config(
        None,
        {
            "task": "text_classification",
            "output_dir": str(workdir / "run"),
            "data.train_file": str(train_file),
            "data.val_file": str(SST2 / "dev.tsv"),
            "data.text_column": "sentence",
            "data.max_length": 64,
            "data.batch_size": 32,
            "training.base_learning_rate": 1e-4,
            "training.num_epochs": 1,
            "training.seed": seed,
            "logging.progress_bar": False,
            "logging.tensorboard": False,
            "checkpoint.save_every_epochs": 0,
            "checkpoint.save_best": False,
            "hardware.mixed_precision": precision,
        },
    )
    summary = train(cfg)
    acc = summary["best_val"]["accuracy"]
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "train_time_s": summary["train_time_s"],
        "dev_accuracy": acc,
    }


def one(line: str, seed: int, rows: int) -> None:
    """Run one line in this process and print its result as JSON on the last line."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if line.startswith("fulltune"):
            result = run_fulltune(seed, rows, work, "no" if line == "fulltune_fp32" else "auto")
        else:
            result = run_trainer(line.startswith("trainer_best"), seed, rows, work, bf16=line == "trainer_best")
    import torch

    threads = torch.get_num_threads()  # as the run ended (fulltune's thread policy may change it while training)
    result.update({"line": line, "seed": seed, "peak_rss_mb": peak_rss_mb(), "threads_at_end": threads})
    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3", help="one run of each line per seed, lines alternating")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--lines", default=None, help="default: the fair lines for this CPU (see above)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if not SST2.is_dir():
        print(f"skipped: {SST2} is not present")
        return 0
    if args.one:
        one(args.one, args.seed, args.rows)
        return 0
    from fulltune.runtime.device import cpu_has_fast_bf16

    slow_bf16 = not cpu_has_fast_bf16()
    kind = cpu_kind()
    print(f"CPU: {kind}")
    lines = args.lines.split(",") if args.lines else default_lines(slow_bf16)
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: list[dict] = []
    if slow_bf16 and "trainer_best" in lines:
        print("this CPU has no bf16 units: bf16 autocast is emulated, so trainer_best runs for the first seed only")
    for seed in seeds:
        for line in lines:  # alternate lines so machine noise spreads over all of them
            if line == "trainer_best" and slow_bf16 and seed != seeds[0]:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--one", line, "--seed", str(seed), "--rows", str(args.rows)],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                print(f"{line} seed {seed} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"  {line:<16} seed {seed}: {row['samples_per_s']:7.1f} samples/s, dev acc {row['dev_accuracy']:.4f}, "
                f"peak RSS {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    table = summarize(results, lines, fair="trainer_best_fp32" if slow_bf16 else "trainer_best")
    print(f"\nCPU: {kind}; {len(seeds)} seed(s), lines alternating\n" + table)
    fp32 = {ln: [r["samples_per_s"] for r in results if r["line"] == ln] for ln in ("fulltune_fp32", LINES[2])}
    if all(fp32.values()):
        ratio = statistics.median(fp32["fulltune_fp32"]) / statistics.median(fp32[LINES[2]])
        print(f"fulltune_fp32 / trainer_best_fp32 (both without bf16): {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": kind, "results": results}, indent=2))
    return 0


def cpu_kind() -> str:
    """'<model name>, N cores, bf16 units (AMX)' or '..., AVX2 only (bf16 emulated)', from /proc/cpuinfo."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "unknown CPU"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    units = (
        "bf16 units (AMX)"
        if "amx_bf16" in flags
        else "bf16 units (AVX512-BF16)"
        if "avx512_bf16" in flags
        else "AVX-512, no bf16 units (bf16 emulated)"
        if "avx512f" in flags
        else "AVX2 only (bf16 emulated)"
    )
    return f"{model}, {os.cpu_count()} cores, {units}"


def default_lines(slow_bf16: bool) -> list[str]:
    """Trainer's defaults, its fair best for this CPU, fulltune; plus bf16 Trainer once where bf16 is emulated."""
    if slow_bf16:
        return ["trainer_default", "trainer_best_fp32", "trainer_best", "fulltune"]
    return ["trainer_default", "trainer_best", "fulltune"]


def summarize(results: list[dict], lines: list[str], fair: str = "trainer_best") -> str:
    med: dict[str, dict] = {}
    for line in lines:
        rows = [r for r in results if r["line"] == line]
        if not rows:
            continue
        accs = [r["dev_accuracy"] for r in rows]
        med[line] = {
            "sps": statistics.median(r["samples_per_s"] for r in rows),
            "mem": statistics.median(r["peak_rss_mb"] for r in rows),
            "acc": statistics.mean(accs),
            "spread": (max(accs) - min(accs)) if len(accs) > 1 else 0.0,
            "n": len(rows),
        }
    out = [
        "| line | runs | samples/s (median) | peak RSS MB (median) | dev acc (mean) | acc spread "
        "| fulltune speed ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    ft = med.get("fulltune")
    for line, m in med.items():
        ratio = f"{ft['sps'] / m['sps']:.2f}x" if ft and line != "fulltune" else ""
        name = f"{line} (Trainer's fair best here)" if line == fair else line
        out.append(
            f"| {name} | {m['n']} | {m['sps']:.1f} | {m['mem']:.0f} | {m['acc']:.4f} | {m['spread']:.4f} | {ratio} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
