"""Peak memory of pruning a ~1B-parameter Llama held in bf16, per parameter, and a LoRA recovery on the result.

Each importance criterion runs in a fresh subprocess: it builds a random-init Llama of about 1.2B parameters
(Llama-3.2-1B's shape: hidden 2048, MLP 8192, 16 layers, 32/8 heads, vocabulary 128,256, tied embeddings) directly
in bf16, and prunes 25% of KV groups and MLP channels in every layer with `fulltune.prune.prune_model`, as
`fulltune prune --torch_dtype auto` does on a bf16 checkpoint. Taylor importance backpropagates 16 calibration
blocks of 128 tokens (batches of 4) of fulltune's built-in text. The peak is `ru_maxrss` at the end minus the
resident set once torch and transformers are imported, divided by the unpruned parameter count: the weights
alone are 2 bytes/param; Taylor adds their gradients (2 bytes for the layers' share) and one calibration batch.
glibc serves every allocation over 64 KiB with mmap, so freed tensors go back to the OS and RSS follows live bytes.

The magnitude child then writes the pruned model (bf16) and a third child runs a LoRA recovery on it through
fulltune's trainer (method lora, model.torch_dtype bfloat16: the base stays bf16, adapters fp32), a few steps.

    .venv/bin/python bench/prune_memory.py            # several minutes on 2 busy CPU cores, ~6 GB of RAM
    .venv/bin/python bench/prune_memory.py --layers 4  # quicker, smaller model
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


def rss_now() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                       max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)


def child_prune(importance: str, layers: int, work: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fulltune.data import lm
    from fulltune.config import load_config
    from fulltune.models import packaged_minilm_path
    from fulltune.prune import PruneConfig, count_parameters, prune_model, save_pruned
    from fulltune.prune_guide import builtin_text

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    calibration = None
    if importance == "taylor":
        train_text, _, _ = builtin_text(work)
        data_cfg = load_config(None, {"data.seq_len": 128}).data
        calibration = lm.load_blocks(train_text, data_cfg, tokenizer, work / "cache", 16, 0).input_ids
    base = rss_now()
    tic = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(layers), dtype=torch.bfloat16).eval()
    params = count_parameters(model)
    built = time.perf_counter() - tic
    after_build = rss_now() - base
    tic = time.perf_counter()
    report = prune_model(model, PruneConfig(pruning_ratio=0.25, importance=importance, prune_mlp=True), calibration)
    pruned_s = time.perf_counter() - tic
    peak = maxrss() - base
    out = {"importance": importance, "parameters": params, "parameters_after": report["params_after"],
           "dtype": str(next(model.parameters()).dtype), "weights_bytes_per_param": after_build / params,
           "peak_bytes_per_param": peak / params, "peak_gib": peak / 2**30, "build_s": built, "prune_s": pruned_s}
    if importance == "magnitude":
        save_pruned(model, tokenizer, work / "pruned", report)
        out["pruned_dir"] = str(work / "pruned")
    return out


def child_recover(work: Path, steps: int) -> dict:
    import torch

    from fulltune.config import load_config
    from fulltune.prune_guide import builtin_text
    from fulltune.train import train

    torch.set_num_threads(2)
    train_text, _, _ = builtin_text(work)
    base = rss_now()
    cfg = load_config(None, {
        "task": "causal_lm", "model.name_or_path": str(work / "pruned"), "model.torch_dtype": "bfloat16",
        "method.name": "lora", "data.train_file": str(train_text), "data.seq_len": 64, "data.batch_size": 1,
        "data.max_samples": 16, "training.max_steps": steps, "training.num_epochs": 1,
        "hardware.mixed_precision": "bf16", "checkpoint.save_every_epochs": 0, "checkpoint.save_best": False,
        "logging.progress_bar": False, "logging.tensorboard": False, "logging.log_every_steps": 1,
        "output_dir": str(work / "recovery")})
    tic = time.perf_counter()
    summary = train(cfg)
    peak = maxrss() - base
    rows = [json.loads(line) for line in (work / "recovery" / "metrics.jsonl").read_text().splitlines()]
    return {"recovery": "lora", "steps": summary["optimizer_steps"], "losses": [r.get("loss") for r in rows],
            "trainable_parameters": summary["trainable_parameters"], "total_parameters": summary["total_parameters"],
            "peak_gib": peak / 2**30, "peak_bytes_per_param": peak / summary["total_parameters"],
            "time_s": time.perf_counter() - tic}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="LoRA recovery steps")
    ap.add_argument("--child", choices=("magnitude", "taylor", "recover"))
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        work = Path(args.work)
        result = child_recover(work, args.steps) if args.child == "recover" else child_prune(args.child, args.layers, work)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for child in ("magnitude", "taylor", "recover"):
            r = run_child(["--child", child, "--work", tmp, "--layers", str(args.layers), "--steps", str(args.steps)])
            print(json.dumps(r), flush=True)
            results.append(r)
    for r in results[:2]:
        print(f"{r['importance']:<10} {r['parameters']:,} params {r['dtype']}: weights {r['weights_bytes_per_param']:.2f} "
              f"B/param, pruning peak {r['peak_bytes_per_param']:.2f} B/param ({r['peak_gib']:.2f} GiB), "
              f"-> {r['parameters_after']:,} params in {r['prune_s']:.0f}s")
    rec = results[2]
    print(f"LoRA recovery on the bf16 pruned model: {rec['steps']} steps, losses {rec['losses']}, "
          f"{rec['trainable_parameters']:,} trainable of {rec['total_parameters']:,}, peak {rec['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
