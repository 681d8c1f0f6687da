"""Full fine-tuning of an 8B model in 24 GB: what `fulltune plan` answers for a Llama-3-8B shape (hidden 4096, 32
layers, 32/8 heads, intermediate 14336, vocab 128256) with `--memory_budget 24GB --device cuda` at sequence length
2048, then a few optimizer steps of exactly that configuration on random init, built directly in bf16 on the GPU;
and the same for the 1.24B shape (Llama-3.2-1B's: hidden 2048, 16 layers, 32/8 heads, intermediate 8192, tied
embeddings). Each shape runs in its own process, so its peak is its own.

The steps are the planner's dry run (`fulltune.planning.dryrun.dry_run`: the trainer's own model preparation,
optimizer and step fused into backward). Printed per shape: the configuration, the plan's estimate, the peak
torch.cuda.max_memory_allocated (bitsandbytes' paged states live in CUDA unified memory, outside PyTorch's
allocator: device_used_bytes, the GPU's used memory after the steps, shows them), and tokens/s of the last step.

    python3 bench/gpu_headline.py --out headline.json     # on the GPU, ~2-3 minutes
    python3 bench/gpu_headline.py --dry-run                # tiny shapes on the CPU: the 8B answer, then its config
                                                           # (CPU equivalents of CUDA-only modes) on a tiny Llama
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
from typing import Any

LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
LLAMA_1B24 = {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16}
LLAMA_1B24["tie_word_embeddings"] = True
LLAMA_TINY = {**LLAMA_8B, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA_TINY |= {"num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 256}
SHAPES = {"llama_8b": LLAMA_8B, "llama_1b24": LLAMA_1B24}
# What a CPU dry run uses in place of a CUDA-only choice: the same code path without the GPU's memory tricks.
CPU_EQUIVALENT = {"training.lean_optimizer": {"paged_adamw8bit": "adamw8bit"}, "training.lean_offload": {True: False}}


def config(shape: dict[str, Any], a: argparse.Namespace, device: str, keys: dict[str, Any]) -> Any:
    from fulltune.config import load_config

    sets = {
        "task": "causal_lm",
        "output_dir": str(Path(a.work) / "run"),
        "model.tiny_config": shape,
        "model.torch_dtype": "bfloat16",
        "model.dropout": 0.0,
        "data.seq_len": a.seq,
        "data.batch_size": a.batch,
        "hardware.device": device,
        "training.seed": 0,
    }
    return load_config(None, sets | keys)


def one(name: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fulltune.planning import FIT_FRACTION, dry_run, estimate, inspect_model
    from fulltune.planning.budget import answer
    from fulltune.units import parse_memory

    budget = parse_memory(a.budget)
    # The answer for the real shape on a GPU: analytic, so the CPU dry mode computes it too.
    real = argparse.Namespace(**{**vars(a), "seq": a.plan_seq})
    ans = answer(config(SHAPES[name], real, "cuda", {}), "causal_lm", None, budget, "cuda", FIT_FRACTION)
    if ans.chosen is None:
        return {"shape": name, "error": f"nothing fits {a.budget}: the lightest misses by {ans.over / 2**30:.2f} GiB"}
    chosen = ans.candidates[ans.chosen]
    keys = dict(chosen.keys)
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda:
        keys = {k: CPU_EQUIVALENT.get(k, {}).get(v, v) for k, v in keys.items()}
    cfg = config(LLAMA_TINY if a.dry_run else SHAPES[name], a, "cuda" if cuda else "cpu", keys)
    device = torch.device("cuda" if cuda else "cpu")
    facts = inspect_model(cfg, "causal_lm", None)
    est = estimate(cfg, "causal_lm", facts, device.type)
    r = dry_run(cfg, "causal_lm", None, facts, device, steps=a.steps)
    if "error" in r:
        return {"shape": name, "error": r["error"]}
    tokens = cfg.data.batch_size * cfg.training.gradient_accumulation_steps * cfg.data.seq_len
    used = None
    if cuda:
        free, total = torch.cuda.mem_get_info()
        used = int(total - free)
    return {
        "shape": name,
        "plan_answer": {
            "mode": chosen.mode,
            "keys": chosen.keys,
            "estimate_bytes": chosen.device_bytes,
            "host_bytes": chosen.host_bytes,
            "seq_len": a.plan_seq,
        },
        "ran": {"keys": keys, "seq_len": cfg.data.seq_len, "parameters": facts.total, "device": str(device)},
        "estimate_bytes": est.peak,
        "peak_bytes": r["measured"],  # CUDA: torch.cuda.max_memory_allocated; CPU: the dry run's peak RSS
        "device_used_bytes": used,
        "step_s": r["step_seconds"],
        "tokens_per_s": tokens / r["step_seconds"],
        "estimate_over_measured": est.peak / r["measured"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the code, not the GPU")
    ap.add_argument("--budget", default="24GB", help="memory budget the plan answers for (default 24GB)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per shape (default 3; dry 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length run (default 2048; dry 64)")
    ap.add_argument("--batch", type=int, default=4, help="configured micro-batch the plan starts from (default 4)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--out", default="gpu_headline.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=".", help=argparse.SUPPRESS)
    ap.add_argument("--plan-seq", type=int, default=2048, help="sequence length the plan answers for (default 2048)")
    a = ap.parse_args()
    a.dry_run = a.dry_run or os.environ.get("GPU_CHECK_DRY") == "1"
    a.steps = a.steps or (2 if a.dry_run else 3)
    a.seq = a.seq or (64 if a.dry_run else 2048)
    if a.one:
        print(json.dumps(one(a.one, a)), flush=True)
        return 0
    results: dict[str, Any] = {"budget": a.budget, "dry_run": a.dry_run, "shapes": {}}
    failed, tmp = False, tempfile.mkdtemp(prefix="gpu_headline-")
    for name in a.shapes.split(","):
        if name not in SHAPES:
            ap.error(f"unknown shape '{name}' (shapes: {', '.join(SHAPES)})")
        began = time.perf_counter()
        args = ["--one", name, "--budget", a.budget, "--steps", str(a.steps), "--seq", str(a.seq)]
        args += ["--batch", str(a.batch), "--plan-seq", str(a.plan_seq), "--work", tmp]
        args += ["--dry-run"] if a.dry_run else []
        env = {
            **os.environ,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        }
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        r = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"shape": name, "error": proc.stderr[-3000:]}
        r["process_s"] = time.perf_counter() - began
        results["shapes"][name] = r
        if "error" in r:
            failed = True
            print(f"{name}: FAILED\n{r['error']}", file=sys.stderr, flush=True)
            continue
        keys = " ".join(f"{k}={v}" for k, v in r["plan_answer"]["keys"].items())
        print(
            f"{name:<11} plan ({a.budget}): {keys}\n{'':<11} {r['tokens_per_s']:9.0f} tokens/s  peak "
            f"{r['peak_bytes'] / 2**30:6.2f} GiB (estimate {r['estimate_bytes'] / 2**30:.2f} GiB)"
            + (f"  GPU used {r['device_used_bytes'] / 2**30:.2f} GiB" if r["device_used_bytes"] else "")
            + f"  ({r['process_s']:.0f} s)",
            flush=True,
        )
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
