"""`fulltune evaluate`: metrics of an exported checkpoint on a split of a data folder, or on one file."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of a checkpoint on a data split or file")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or export folder (e.g. RUN/best)")
    p.add_argument("--data_dir", help="data folder holding the split")
    p.add_argument(
        "--split",
        default="test",
        help="split to evaluate: dev, val, validation, test or train (from a dataset: also any split it has)",
    )
    p.add_argument(
        "--file", help="a table (classifiers) or a text or JSONL file (perplexity) instead of data_dir/split"
    )
    p.add_argument(
        "--dataset_name",
        help="a `datasets` hub id or save_to_disk folder, read with the run's columns (default without --data_dir "
        "or --file: the run's data.dataset_name)",
    )
    p.add_argument(
        "--output_dir", help="where the results go (default: <run>/eval/<checkpoint name>-<split or file stem>)"
    )
    p.add_argument("--batch_size", type=int, default=32, help="examples per forward pass")
    p.add_argument(
        "--block_size",
        type=int,
        help="perplexity: tokens per window, >= 2 (default: the run's data.seq_len). Perplexity is exp(mean NLL) over "
        "the file framed as training frames it ([BOS] text EOS per record; a JSONL prompt is context only): each "
        "counted token is predicted from the tokens before it in its window, the first token of a block is not "
        "counted; the training run's validation and `prune` compute the same number",
    )
    p.add_argument(
        "--stride",
        type=int,
        help="perplexity: sliding windows that start every STRIDE tokens (1 to block size), each token counted once "
        "(default: non-overlapping blocks)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fulltune.eval.evaluate import evaluate_checkpoint, format_table

    metrics = evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
        split=args.split,
        output_dir=args.output_dir,
        file=args.file,
        batch_size=args.batch_size,
        device=args.device,
        block_size=args.block_size,
        stride=args.stride,
        dataset_name=args.dataset_name,
    )
    labels = metrics.get("labels") or None
    print(f"evaluation of {args.checkpoint} on {args.file or metrics.get('dataset') or args.split}:")
    print(format_table(metrics, labels))
    if "output_dir" in metrics:
        matrix = ["confusion_matrix.csv", "confusion_matrix.png"] if "confusion_matrix" in metrics else []
        shown = ["metrics.json", *matrix, "predictions.jsonl"]
        print(f"written: {metrics['output_dir']}/" + ", ".join(metrics.get("written") or shown))
    return 0
