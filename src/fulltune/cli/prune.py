"""`fulltune prune`: structured pruning of a Llama-family decoder, perplexity before and after, and recovery
training (the work: `fulltune.prune.pipeline`); the flags of the recovery guide's script keep working."""

from __future__ import annotations

import argparse
from typing import Any

from fulltune.prune.flags import FINETUNE_FLAGS


def register(subparsers: Any) -> None:
    """Register `prune` on an argparse subparsers object; `args.func(args)` then runs it."""
    p = subparsers.add_parser(
        "prune",
        help="structured pruning of a Llama-family decoder, then optional recovery fine-tuning",
        description="Prune KV groups (and MLP channels with --prune_mlp) of a Llama/Qwen2/Mistral causal LM, "
        "report perplexity, and recover with fulltune's trainer (--finetune).",
    )
    p.add_argument(
        "--model",
        "--base_model",
        dest="base_model",
        required=True,
        help="model folder or hub id (a pruned folder prunes further)",
    )
    p.add_argument("--save_ckpt_log_name", default="pruned", help="run name; the output folder is outputs/NAME")
    p.add_argument("--output_dir", help="output folder (overrides outputs/<save_ckpt_log_name>)")
    p.add_argument("--pruning_ratio", type=float, default=0.25, help="fraction of KV groups / MLP channels removed")
    p.add_argument("--prune_mlp", action="store_true", help="also prune MLP channels (attention is always pruned)")
    p.add_argument("--importance", choices=("taylor", "magnitude"), default="taylor", help="importance criterion")
    p.add_argument(
        "--layer_ratios",
        choices=("uniform", "importance"),
        default="uniform",
        help="same ratio in every layer, or more in less important layers (same mean)",
    )
    p.add_argument("--layer_start", type=int, default=0, help="first layer to prune")
    p.add_argument("--layer_end", type=int, help="layer after the last one to prune (default: the last layer)")
    p.add_argument("--importance_samples", type=int, default=16, help="calibration blocks for taylor importance")
    p.add_argument("--importance_seq_len", type=int, default=128, help="tokens per calibration block")
    p.add_argument(
        "--train_file",
        "--data_file",
        dest="data_file",
        help="text or JSONL file for calibration and recovery training "
        "(default: fulltune's built-in English text, see fulltune.prune.guide)",
    )
    p.add_argument(
        "--val_file",
        "--eval_file",
        dest="eval_file",
        help="text file for perplexity (--test_after_prune, --finetune; default: the built-in text's held-out split)",
    )
    p.add_argument(
        "--torch_dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="dtype the model is read, pruned and written in (auto: the checkpoint's); also the recovery "
        "run's model.torch_dtype (full recovery keeps fp32 master weights, LoRA keeps the base in it)",
    )
    p.add_argument("--save_model", action="store_true", help="write the pruned model to OUTPUT/pruned")
    p.add_argument("--test_after_prune", action="store_true", help="report perplexity before and after pruning")
    p.add_argument("--finetune", action="store_true", help="recovery training after pruning (saves pruned/ too)")
    p.add_argument("--config", help="fulltune YAML whose options the recovery run uses")
    for flag, (key, default) in FINETUNE_FLAGS.items():
        kind: Any = {str: str, int: int, float: float}[type(default)]
        extra = {"choices": ("full", "lora", "qlora")} if flag == "finetune_method" else {}
        p.add_argument(f"--{flag}", type=kind, help=f"sets {key} (default {default}, or the --config value)", **extra)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recovery run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.prune.pipeline import run_prune

    return run_prune(args)
