"""`fulltune export RUN_OR_CHECKPOINT --output_dir DIR`: a clean folder to ship (the machinery is
`fulltune.state.export`)."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from fulltune.config import ModelConfig

# The floating-point dtypes a model's weights may be in (model.torch_dtype's values but `auto`).
DTYPES = tuple(d for d in typing.get_args(typing.get_type_hints(ModelConfig)["torch_dtype"]) if d != "auto")


def register(subparsers: Any) -> None:
    """Register `export` on an argparse subparsers object; `args.func(args)` then runs it."""
    p = subparsers.add_parser(
        "export",
        help="a clean folder to ship: weights in a dtype, LoRA merged or as an "
        "adapter, a model card, no training state",
    )
    p.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a run folder (its best/, else its newest checkpoint), a checkpoint or best/ folder, a "
        "`fulltune prune` output or its pruned/ folder",
    )
    p.add_argument(
        "--output_dir", required=True, help="the folder to write: new, empty, or an earlier export (replaced whole)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the floating-point weights")
    p.add_argument(
        "--lora",
        choices=("merged", "adapter"),
        default="merged",
        help="LoRA runs: a plain model with the adapter merged in, or the adapter alone (peft)",
    )
    p.add_argument("--push_to_hub", metavar="REPO", help="also upload the folder to this Hugging Face repo")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.state.export import export, hub_token, push_to_hub

    token = hub_token() if args.push_to_hub else None  # before any slow work
    out = export(args.source, args.output_dir, dtype=args.dtype, lora=args.lora)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {out}: {', '.join(files)}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private, token)}")
    return 0
