"""Full fine-tuning throughput on one GPU: fulltune (standard and lean mode, eager and compiled) against Hugging Face
Trainer with its best flags, on the same job. Tokens/s, MFU and peak memory; one JSON with every figure.

The job: a ~1.1B-parameter Llama (TinyLlama's shape: 22 layers, hidden 2048, GQA 32/4 heads, vocab 32000; random
init from the config, nothing downloaded), sequence length 2048, micro-batch 4, lr 1e-5, a synthetic word-level
corpus (bench/synthetic_lm.py) packed into 2048-token blocks. Every line runs in its own process, so its peak
memory is its own.

  fulltune          `fulltune train` defaults: bf16 autocast over fp32 weights, fused AdamW
  fulltune_compile  the same with training.compile=true
  fulltune_lean     training.memory=lean: bf16 weights, BF16AdamW fused into backward, gradient checkpointing
  trainer_best      Trainer with bf16, tf32, adamw_torch_fused (sdpa attention, the default)
  trainer_compile   trainer_best with torch_compile=True

Tokens/s is the steady rate: optimizer steps after the first `--warmup` (start-up, cuDNN autotuning, compilation)
over the time they took, measured at host syncs. MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak
(H100 SXM and H200: 989 TFLOP/s), FLOPs per token = 6 x (parameters - input embedding) + 12 x layers x hidden x
seq_len (attention scores and values, PaLM's convention: the causal half is not taken off).

    python3 bench/gpu_throughput.py --out gpu_throughput.json       # on the GPU, ~4 minutes
    python3 bench/gpu_throughput.py --dry-run                         # a tiny Llama on the CPU, the same code
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
LINES = ("fulltune", "fulltune_compile", "fulltune_lean", "trainer_best", "trainer_compile")

LLAMA_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
LLAMA_DRY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device_name: str) -> float | None:
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_token(cfg: dict[str, Any], n_params: int, seq_len: int) -> float:
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    return 6.0 * (n_params - embed) + 12.0 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq_len


def device_peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_fulltune(line: str, a: argparse.Namespace, work: Path, model_cfg: dict) -> dict[str, Any]:
    from fulltune.config import load_config
    from fulltune.training.trainer import train

    sets = {
        "task": "causal_lm",
        "output_dir": str(work / f"run-{line}"),  # one run per folder: each line its own
        "model.tiny_config": model_cfg,
        "model.tokenizer": str(work / "tok"),
        "model.dropout": 0.0,
        "data.train_file": str(work / "train.txt"),
        "data.seq_len": a.seq,
        "data.batch_size": a.batch,
        "data.num_workers": 0,
        "training.base_learning_rate": 1e-5,
        "training.warmup_ratio": 0.0,
        "training.max_steps": a.steps,
        "training.num_epochs": 1,
        "training.seed": 0,
        "training.compile": line == "fulltune_compile",
        "training.memory": "lean" if line == "fulltune_lean" else "standard",
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "logging.log_every_steps": a.warmup,
        "checkpoint.save_every_epochs": 0,
        "checkpoint.save_best": False,
    }
    summary = train(load_config(None, sets))
    rows = [json.loads(r) for r in (work / f"run-{line}" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_s" in r]
    first, last = rows[0], rows[-1]  # log points at steps warmup, 2*warmup, ...: host syncs
    steady_s = last["time_s"] - first["time_s"]
    return {
        "steady_steps": last["step"] - first["step"],
        "steady_s": steady_s,
        "loss_last": last["loss"],
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "trainable_parameters": summary["trainable_parameters"],
        "loop_s": summary["train_time_s"],
    }


def run_trainer(line: str, a: argparse.Namespace, work: Path, model_cfg: dict) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from fulltune.config import DataConfig
    from fulltune.data.lm import pack, read_records, tokenize_records

    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "tok"))
    ids, labels = pack(*tokenize_records(read_records(work / "train.txt", DataConfig()), tok), a.seq)
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]  # the blocks fulltune trains on
    torch.manual_seed(0)
    conf = AutoConfig.for_model(**model_cfg)
    model = AutoModelForCausalLM.from_config(conf)
    cuda = torch.cuda.is_available()
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        """Time at the same steps as fulltune's log points, after a host sync."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % a.warmup == 0:
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    bf16 = cuda or os.environ.get("GPU_CHECK_DRY") == "1"  # in dry mode, on the CPU: the same flags
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=a.batch,
        learning_rate=1e-5,
        max_steps=a.steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        bf16=bf16,
        tf32=True if cuda else None,
        optim="adamw_torch_fused",
        torch_compile=line == "trainer_compile",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        use_cpu=not cuda,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=[Clock()]
    )
    start = time.perf_counter()
    out = trainer.train()
    loop_s = time.perf_counter() - start
    steps = sorted(marks)
    return {
        "steady_steps": steps[-1] - steps[0],
        "steady_s": marks[steps[-1]] - marks[steps[0]],
        "loss_last": out.training_loss,
        "peak_memory_bytes": device_peak_bytes(),
        "trainable_parameters": sum(p.numel() for p in model.parameters()),
        "loop_s": loop_s,
    }


def one(line: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    model_cfg = LLAMA_DRY if a.dry_run else LLAMA_1B
    fn = run_fulltune if line.startswith("fulltune") else run_trainer
    r = fn(line, a, work, model_cfg)
    tokens_per_s = r["steady_steps"] * a.batch * a.seq / max(r["steady_s"], 1e-9)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name) if torch.cuda.is_available() else None
    fpt = flops_per_token(model_cfg, r["trainable_parameters"], a.seq)
    r.update(
        {
            "line": line,
            "device": name,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": fpt,
            "model_tflops": tokens_per_s * fpt / 1e12,
            "mfu": tokens_per_s * fpt / peak if peak else None,
            "peak_memory_gib": r["peak_memory_bytes"] / 2**30,
        }
    )
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny Llama on the CPU: checks the code, not the speed")
    ap.add_argument(
        "--lines", default=None, help="default: all; dry: the uncompiled ones (inductor's CPU build is slow)"
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per line (default 30; dry 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the steady rate (default 10; dry 2)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 4; dry 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; dry 32)")
    ap.add_argument("--out", default="gpu_throughput.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dry = a.dry_run or os.environ.get("GPU_CHECK_DRY") == "1"
    a.dry_run = dry
    for key, full, small in (("steps", 30, 4), ("warmup", 10, 2), ("batch", 4, 2), ("seq", 2048, 32)):
        if getattr(a, key) is None:
            setattr(a, key, small if dry else full)
    if a.lines is None:
        a.lines = ",".join(x for x in LINES if not (dry and x.endswith("compile")))
    if a.steps < 2 * a.warmup:
        ap.error("--steps must be at least 2 x --warmup (the steady rate needs two log points)")
    if a.one:
        print(json.dumps(one(a.one, a, Path(a.work))), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not dry:
        print("gpu_throughput: error: no CUDA device (use --dry-run for the CPU check)", file=sys.stderr)
        return 2
    from synthetic_lm import write_corpus, write_tokenizer

    model_cfg = LLAMA_DRY if dry else LLAMA_1B
    results: dict[str, Any] = {
        "job": {
            "model": model_cfg,
            "seq_len": a.seq,
            "micro_batch": a.batch,
            "steps": a.steps,
            "warmup_steps": a.warmup,
            "dry_run": dry,
        },
        "lines": {},
        "failed": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_tokenizer(work / "tok", model_cfg["vocab_size"])
        write_corpus(work / "train.txt", (a.steps + 2) * a.batch * a.seq, model_cfg["vocab_size"], seed=0)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        }
        passthrough = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq", str(a.seq)]
        for line in a.lines.split(","):
            if line not in LINES:
                ap.error(f"unknown line '{line}' (lines: {', '.join(LINES)})")
            began = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    line,
                    "--work",
                    str(work),
                    *passthrough,
                    *(["--dry-run"] if dry else []),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                results["failed"][line] = proc.stderr[-3000:]
                print(f"{line}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - began
            results["lines"][line] = r
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(
                f"{line:<17} {r['tokens_per_s']:10.0f} tokens/s  MFU {mfu:>6}  peak {r['peak_memory_gib']:6.2f} GiB"
                f"  ({r['process_s']:.0f} s)",
                flush=True,
            )
    lines = results["lines"]
    best_trainer = max((v["tokens_per_s"] for k, v in lines.items() if k.startswith("trainer")), default=None)
    best_fulltune = max((v["tokens_per_s"] for k, v in lines.items() if k.startswith("fulltune")), default=None)
    results["ratio_fulltune_best_to_trainer_best"] = (
        best_fulltune / best_trainer if best_trainer and best_fulltune else None
    )
    for name in ("fulltune", "fulltune_compile", "fulltune_lean"):
        if name in lines and best_trainer:
            results[f"ratio_{name}_to_trainer_best"] = lines[name]["tokens_per_s"] / best_trainer
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(
        f"wrote {a.out}"
        + (
            f"; fulltune / Trainer (best of each): {results['ratio_fulltune_best_to_trainer_best']:.2f}x"
            if results["ratio_fulltune_best_to_trainer_best"]
            else ""
        )
    )
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
