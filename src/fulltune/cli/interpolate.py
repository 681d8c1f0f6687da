"""`fulltune interpolate` (WiSE-FT): (1 - alpha) x zero-shot + alpha x fine-tuned CLIP weights, one alpha or a sweep
evaluated on a split; the result is an ordinary export (the machinery is `fulltune.clip.interpolate`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "interpolate",
        help="WiSE-FT: mix zero-shot and fine-tuned CLIP weights, (1-alpha)*zero-shot + alpha*fine-tuned",
        description="The result is an ordinary export. --zeroshot is a fulltune export of the zero-shot model, or "
        "the CLIP model the run started from (folder or hub id): its zero-shot head is built with the "
        "fine-tuned run's labels, prompts and class names.",
    )
    p.add_argument("--zeroshot", required=True, help="zero-shot export, or the base CLIP model (folder or hub id)")
    p.add_argument("--finetuned", required=True, help="export of a run with method.head_init zeroshot or linear_probe")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model (default 0.5)")
    p.add_argument("--alphas", help="sweep, e.g. 0,0.25,0.5,0.75,1: evaluated on --data_dir/--split, the best kept")
    p.add_argument("--data_dir", help="image data folder with <split>/<class>/ folders")
    p.add_argument("--split", default="val")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.clip.interpolate import format_sweep, parse_alphas, wise_ft

    alphas = parse_alphas(args.alphas) if args.alphas else parse_alphas(str(args.alpha))
    result = wise_ft(
        args.zeroshot, args.finetuned, args.output_dir, alphas, args.data_dir, args.split, args.batch_size, args.device
    )
    if result["split"]:
        print(f"WiSE-FT sweep on {args.data_dir}/{args.split} ({args.zeroshot} -> {args.finetuned}):")
        print(format_sweep(result))
    print(f"wrote {result['output_dir']}: alpha {result['alpha']:g} (0 = zero-shot, 1 = fine-tuned)")
    return 0
