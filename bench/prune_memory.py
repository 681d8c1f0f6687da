"""Peak memory of pruning a ~1B-parameter Llama held in bf16, per parameter, and a LoRA recovery on the result.

A first subprocess writes a random-init Llama of about 1.2B parameters (Llama-3.2-1B's shape: hidden 2048, MLP 8192,
16 layers, 32/8 heads, vocabulary 128,256, tied embeddings) as a bf16 checkpoint. Each importance criterion then
runs in a fresh subprocess: it loads the checkpoint as `fulltune prune --torch_dtype auto` does (in its own dtype,
bf16) and prunes 25% of KV groups and MLP channels in every layer with `fulltune.model.pruning.prune_model`. Taylor
importance backpropagates one batch of 4 calibration blocks of 128 tokens of fulltune's built-in text.

Magnitude runs twice: on the weights as `fulltune prune` loads them (safetensors maps the checkpoint file; RSS counts
its pages once touched) and with the weights copied into anonymous memory first (the figure that holds however the
weights arrived; Taylor runs so). The peak is the peak resident set (VmHWM, reset once the code paths are warm, and
after the copy) minus the resident set before loading, divided by the unpruned parameter count: the weights alone
are 2 bytes/param; Taylor
adds their gradients (2 bytes for the layers' share) and one calibration batch. glibc serves every allocation over
64 KiB with mmap, so freed tensors go back to the OS and RSS follows live bytes.

The magnitude child then writes the pruned model (bf16) and a third child runs a LoRA recovery on it through
fulltune's trainer (method lora, model.torch_dtype bfloat16: the base stays bf16, adapters fp32), a few steps.

    .venv/bin/python bench/prune_memory.py            # several minutes on 2 busy CPU cores, ~6 GB of RAM
    .venv/bin/python bench/prune_memory.py --layers 4  # quicker, smaller model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALIBRATION_BLOCKS = 4
"""One calibration batch (PruneConfig's batch of 4 blocks of 128 tokens): the peak holds one batch whatever the
count (gradients accumulate in place); more blocks only take longer (16 take ~1 h on 2 busy cores at 1B)."""


def _status(key: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_now() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak resident set since the last `reset_peak` (VmHWM)."""
    return _status("VmHWM")


def reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
    )


def child_build(layers: int, work: Path) -> dict:
    """The random-init model, written in bf16 as a checkpoint folder (with the packaged MiniLM tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fulltune.model.bundle import packaged_minilm_path

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(layers), dtype=torch.bfloat16)
    model.save_pretrained(work / "base")
    AutoTokenizer.from_pretrained(str(packaged_minilm_path())).save_pretrained(work / "base")
    return {"parameters": sum(p.numel() for p in model.parameters())}


def child_prune(importance: str, work: Path, materialize: bool) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from fulltune.config import load_config
    from fulltune.data import lm
    from fulltune.model.pruning import PruneConfig, parameter_count, prune_model
    from fulltune.prune.folder import save_pruned
    from fulltune.prune.guide import builtin_text
    from fulltune.prune.pipeline import _load_base

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    # Warm up the code paths (lazily imported modules are not the pruning's memory).
    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        )
    )
    warm_ids = torch.randint(0, 1000, (4, 16))
    prune_model(tiny.to(torch.bfloat16), PruneConfig(0.25, importance=importance, calibration_block_size=16), warm_ids)
    model, tokenizer = _load_base(str(work / "base"), torch.device("cpu"), "float32")  # warms the loading path
    del model, tiny
    calibration = None
    if importance == "taylor":
        train_text, _, _ = builtin_text(work)
        data_cfg = load_config(None, {"data.seq_len": 128}).data
        calibration = lm.load_blocks(train_text, data_cfg, tokenizer, work / "cache", CALIBRATION_BLOCKS, 0).input_ids
    reset_peak()
    base = rss_now()
    tic = time.perf_counter()
    model, _ = _load_base(str(work / "base"), torch.device("cpu"), "auto")  # as `fulltune prune --torch_dtype auto`
    params = parameter_count(model)
    if materialize:  # weights in anonymous memory, not file pages mapped from the checkpoint (which RSS counts only
        with torch.no_grad():  # once touched): the pruning's peak is then weights + what pruning adds
            for p in model.parameters():
                p.data = p.data.clone()
        reset_peak()
    load_s = time.perf_counter() - tic
    loaded, load_peak = rss_now() - base, peak_rss() - base
    tic = time.perf_counter()
    report = prune_model(model, PruneConfig(pruning_ratio=0.25, importance=importance, prune_mlp=True), calibration)
    pruned_s = time.perf_counter() - tic
    peak = peak_rss() - base
    out = {
        "importance": importance,
        "weights": "anonymous memory" if materialize else "mmap of the checkpoint",
        "parameters": params,
        "parameters_after": report["params_after"],
        "dtype": str(next(model.parameters()).dtype),
        "loaded_bytes_per_param": loaded / params,
        "load_peak_bytes_per_param": load_peak / params,
        "peak_bytes_per_param": peak / params,
        "peak_gib": peak / 2**30,
        "load_s": load_s,
        "prune_s": pruned_s,
    }
    if importance == "magnitude" and not materialize and not (work / "pruned").exists():
        save_pruned(model, tokenizer, work / "pruned", report)
        out["pruned_dir"] = str(work / "pruned")
    return out


def child_recover(work: Path, steps: int) -> dict:
    import torch

    from fulltune.config import load_config
    from fulltune.prune.guide import builtin_text
    from fulltune.training.trainer import train

    torch.set_num_threads(2)
    train_text, _, _ = builtin_text(work)
    reset_peak()
    base = rss_now()
    cfg = load_config(
        None,
        {
            "task": "causal_lm",
            "model.name_or_path": str(work / "pruned"),
            "model.torch_dtype": "bfloat16",
            "method.name": "lora",
            "data.train_file": str(train_text),
            "data.seq_len": 64,
            "data.batch_size": 1,
            "data.max_samples": 16,
            "training.max_steps": steps,
            "training.num_epochs": 1,
            "hardware.mixed_precision": "bf16",
            "checkpoint.save_every_epochs": 0,
            "checkpoint.save_best": False,
            "logging.progress_bar": False,
            "logging.tensorboard": False,
            "logging.log_every_steps": 1,
            "output_dir": str(work / "recovery"),
        },
    )
    tic = time.perf_counter()
    summary = train(cfg)
    peak = peak_rss() - base
    rows = [json.loads(line) for line in (work / "recovery" / "metrics.jsonl").read_text().splitlines()]
    return {
        "recovery": "lora",
        "steps": summary["optimizer_steps"],
        "losses": [r.get("loss") for r in rows],
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "peak_gib": peak / 2**30,
        "peak_bytes_per_param": peak / summary["total_parameters"],
        "time_s": time.perf_counter() - tic,
    }


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
    ap.add_argument("--child", choices=("build", "magnitude", "taylor", "recover"))
    ap.add_argument("--materialize", action="store_true")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        work = Path(args.work)
        if args.child == "build":
            result = child_build(args.layers, work)
        elif args.child == "recover":
            result = child_recover(work, args.steps)
        else:
            result = child_prune(args.child, work, args.materialize)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for child in ("build", "magnitude", "magnitude+", "taylor+", "recover"):
            flags = ["--materialize"] if child.endswith("+") else []
            r = run_child(
                [
                    "--child",
                    child.rstrip("+"),
                    "--work",
                    tmp,
                    "--layers",
                    str(args.layers),
                    "--steps",
                    str(args.steps),
                    *flags,
                ]
            )
            print(json.dumps(r), flush=True)
            results.append(r)
    for r in results[1:4]:
        print(
            f"{r['importance']:<10} {r['parameters']:,} params {r['dtype']}, weights in {r['weights']}: loaded "
            f"{r['loaded_bytes_per_param']:.2f} "
            f"B/param (load peak {r['load_peak_bytes_per_param']:.2f}), load + prune peak "
            f"{r['peak_bytes_per_param']:.2f} B/param ({r['peak_gib']:.2f} GiB) above the baseline, "
            f"-> {r['parameters_after']:,} params in {r['prune_s']:.0f}s"
        )
    rec = results[4]
    print(
        f"LoRA recovery on the bf16 pruned model: {rec['steps']} steps, losses {rec['losses']}, "
        f"{rec['trainable_parameters']:,} trainable of {rec['total_parameters']:,}, peak {rec['peak_gib']:.2f} GiB"
    )


if __name__ == "__main__":
    main()
