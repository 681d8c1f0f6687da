"""`fulltune` command line: argument parsing and dispatch only.

Every expected failure (bad config, bad data, a NaN loss) ends in one line `fulltune: error: ...` and a non-zero
exit status; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--data_dir", help="data folder (sets data.data_dir)")
    p.add_argument("--output_dir", help="run folder (sets output_dir)")
    p.add_argument("--train_file", help="sets data.train_file")
    p.add_argument("--val_file", help="sets data.val_file")
    p.add_argument("--test_file", help="sets data.test_file")
    p.add_argument("--model", help="sets model.name_or_path")
    p.add_argument("--task", help="sets task")
    p.add_argument("--method", help="sets method.name (full, partial, linear_probe, lora)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.base_learning_rate=1e-5")


def load_cli_config(args: argparse.Namespace):  # noqa: ANN201 - returns fulltune.config.Config
    from fulltune.config import flag_overrides, load_config

    # Flags come first so that explicit key=value overrides win over them.
    return load_config(args.config, flag_overrides(args) + list(args.overrides or []))


def cmd_train(args: argparse.Namespace) -> int:
    from fulltune.train import train

    cfg = load_cli_config(args)  # validate here, before any process is started
    if args.nproc and args.nproc > 0:
        from fulltune.distributed import launch

        argv = list(args.argv)
        i = argv.index("--nproc") if "--nproc" in argv else None
        if i is not None:
            del argv[i : i + 2]
        else:
            argv = [a for a in argv if not a.startswith("--nproc=")]
        return launch(args.nproc, argv)
    train(cfg, resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fulltune.evaluate import evaluate_checkpoint, format_table

    metrics = evaluate_checkpoint(
        args.checkpoint, data_dir=args.data_dir, split=args.split, output_dir=args.output_dir, file=args.file,
        batch_size=args.batch_size, device=args.device, block_size=args.block_size, stride=args.stride,
    )
    labels = metrics.get("labels") or None
    print(f"evaluation of {args.checkpoint} on {args.file or args.split}:")
    print(format_table(metrics, labels))
    if "output_dir" in metrics:
        print(f"written: {metrics['output_dir']}/metrics.json, confusion_matrix.csv, confusion_matrix.png")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fulltune.models import load_exported
    from fulltune.predict import classify, generate, image_paths, text_inputs
    from fulltune.runtime import resolve_device

    bundle = load_exported(args.checkpoint, resolve_device(args.device))
    if bundle.task == "causal_lm":
        prompts = text_inputs(args.prompt or args.text, args.file)
        for prompt in prompts:
            print(json.dumps({"prompt": prompt, "generated": generate(bundle, prompt, args.max_new_tokens, args.temperature, args.top_p)}, ensure_ascii=False))
        return 0
    if bundle.task == "image_classification":
        if not args.image:
            raise SystemExit("fulltune: error: this checkpoint classifies images: give --image PATH (file or folder)")
        inputs: list = image_paths(args.image)
        shown = [str(p) for p in inputs]
    else:
        inputs = text_inputs(args.text, args.file)
        shown = inputs
    for name, top in zip(shown, classify(bundle, inputs, args.top_k), strict=True):
        print(json.dumps({"input": name, "top_k": [{"label": lb, "probability": round(p, 4)} for lb, p in top]}, ensure_ascii=False))
    return 0


def cmd_prepare_images(args: argparse.Namespace) -> int:
    from fulltune.data.images import prepare_images

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        split = ()
    if len(split) != 3:
        raise SystemExit(f"fulltune: error: --split '{args.split}': expected three fractions, e.g. 0.8,0.1,0.1")
    counts = prepare_images(args.src_dir, args.output_dir, split, seed=args.seed)  # type: ignore[arg-type]
    print(f"wrote {args.output_dir}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fulltune.demo import run_demo

    run_demo(args.output_dir, extra_overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fulltune", description="Full fine-tuning of pretrained transformers, and its rivals.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a YAML config plus overrides")
    _add_train_args(p)
    p.add_argument("--resume", help="'auto' (newest checkpoint in output_dir), a run folder, or a checkpoint folder")
    p.add_argument("--nproc", type=int, help="run N data-parallel processes on this node (torchrun shortcut)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a data split or file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_dir")
    p.add_argument("--split", default="test")
    p.add_argument("--file", help="a table (classifiers) or text file (perplexity) instead of data_dir/split")
    p.add_argument("--output_dir")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--block_size", type=int, help="perplexity: tokens per window (default: the run's seq_len)")
    p.add_argument("--stride", type=int, help="perplexity: sliding-window stride (default: non-overlapping blocks)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k labels for images or texts, or generated text")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", help="an image file or a folder of images")
    p.add_argument("--text", help="one text to classify")
    p.add_argument("--file", help="a file with one text (or prompt) per line")
    p.add_argument("--prompt", help="causal LM: the prompt to continue")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("prepare-images", help="split a folder of class folders into train/val/test")
    p.add_argument("src_dir")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--split", default="0.8,0.1,0.1")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_prepare_images)

    p = sub.add_parser("demo", help="the embedded default: MiniLM fully fine-tuned on stdlib docstrings")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    from fulltune.compare import add_compare_parser
    from fulltune.plan import add_plan_parser
    from fulltune.prune_cmd import add_prune_parser

    add_compare_parser(sub)
    add_plan_parser(sub)
    add_prune_parser(sub)
    __import__("fulltune.export").export.add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fulltune.config import ConfigError
    from fulltune.data.text import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import transformers

    # Our own progress bar and log lines say what happens; transformers' per-shard bars only add noise.
    transformers.utils.logging.disable_progress_bar()
    try:
        from fulltune.train import TrainingError

        return int(args.func(args) or 0)
    except (ConfigError, DataError, TrainingError) as err:
        from fulltune.runtime import rank, world_size

        where = f"[rank {rank()}] " if world_size() > 1 else ""
        print(f"fulltune: error: {where}{err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print("fulltune: interrupted; resume with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
