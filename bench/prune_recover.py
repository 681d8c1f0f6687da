"""Prune-then-recover on a small Llama-style model, end to end with fulltune and no download.

No pretrained LM can be fetched here, so the script first makes one: a byte-level BPE tokenizer and a ~4M-parameter
Llama (GQA) trained with `fulltune.training.trainer.train` on the first 90% of tiny Shakespeare. It then runs
`fulltune prune`
(25% of KV groups and MLP channels, Taylor importance) with recovery training, and, as a control, gives the unpruned
model the same extra training: recovered vs control is the cost of pruning, pruned vs original what recovery had to
win back. Perplexities are on the held-out last 10% of the text.

    .venv/bin/python bench/prune_recover.py [--output_dir outputs/bench_prune_recover]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"

MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
VOCAB = 2048
SEQ_LEN = 128
QUIET = {"logging.progress_bar": False, "logging.tensorboard": False, "logging.log_every_steps": 20}
PRETRAIN = {
    "data.seq_len": SEQ_LEN,
    "data.batch_size": 16,
    "training.num_epochs": 1,
    "training.base_learning_rate": 2e-3,
    "training.warmup_ratio": 0.05,
    "training.lr_scheduler": "cosine",
    "training.min_lr_ratio": 0.05,
    "training.weight_decay": 0.1,
    "checkpoint.keep_last": 1,
}
# Recovery, in the seed script's flags: 480 blocks (~61k tokens, a sixth of the training text) drawn across the whole
# file, one epoch, at about twice the learning rate pretraining ended at.
RECOVERY = {
    "finetune_method": "full",
    "finetune_lr": 2e-4,
    "finetune_epochs": 1,
    "finetune_samples": 480,
    "finetune_batch_size": 16,
    "finetune_seq_len": SEQ_LEN,
    "finetune_grad_accum": 1,
    "finetune_max_grad_norm": 1.0,
    "finetune_weight_decay": 0.1,
    "finetune_warmup_steps": 4,
}


def split_text(out: Path) -> tuple[Path, Path]:
    """First 90% of the lines to train on, the last 10% held out (a contiguous tail: no overlap with training)."""
    lines = DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.9)
    train, heldout = out / "train.txt", out / "heldout.txt"
    train.write_text("".join(lines[:cut]), encoding="utf-8")
    heldout.write_text("".join(lines[cut:]), encoding="utf-8")
    return train, heldout


def train_tokenizer(text_file: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text_file.read_text(encoding="utf-8")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


def pretrain(train_file: Path, tokenizer: Path, out: Path) -> Path:
    from fulltune.config import load_config
    from fulltune.training.trainer import train

    cfg = load_config(
        None,
        {
            **PRETRAIN,
            **QUIET,
            "task": "causal_lm",
            "output_dir": str(out),
            "model.tiny_config": {**MODEL, "vocab_size": VOCAB},
            "model.tokenizer": str(tokenizer),
            "data.train_file": str(train_file),
        },
    )
    return Path(train(cfg)["last_checkpoint"])


def control(base: Path, train_file: Path, out: Path) -> Path:
    """The unpruned model given exactly the recovery run's training."""
    from fulltune.config import load_config
    from fulltune.prune.flags import FINETUNE_FLAGS, SCRIPT_DEFAULTS
    from fulltune.training.trainer import train

    values = {FINETUNE_FLAGS[flag][0]: v for flag, v in RECOVERY.items()}
    cfg = load_config(
        None,
        {
            **SCRIPT_DEFAULTS,
            **values,
            **QUIET,
            "task": "causal_lm",
            "output_dir": str(out),
            "model.name_or_path": str(base),
            "data.train_file": str(train_file),
        },
    )
    return Path(train(cfg)["last_checkpoint"])


def perplexity_of(folder: Path, heldout: Path) -> dict[str, Any]:
    from fulltune.eval.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(folder, file=str(heldout), output_dir=folder.parent / "eval-heldout")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/bench_prune_recover")
    parser.add_argument("--no_control", action="store_true", help="skip the unpruned control run")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is not here (the shared data folder is not part of a user's clone)")
        return 0
    import transformers

    from fulltune.cli import build_parser

    transformers.utils.logging.disable_progress_bar()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = tic = time.perf_counter()
    train_file, heldout = split_text(out)
    tokenizer = train_tokenizer(train_file, out / "tokenizer")
    times["tokenizer"] = time.perf_counter() - tic

    tic = time.perf_counter()
    base = pretrain(train_file, tokenizer, out / "pretrain")
    times["pretrain"] = time.perf_counter() - tic

    tic = time.perf_counter()
    prune_parser = build_parser()
    argv = [
        "prune",
        "--base_model",
        str(base),
        "--output_dir",
        str(out / "prune"),
        "--pruning_ratio",
        "0.25",
        "--prune_mlp",
        "--importance",
        "taylor",
        "--importance_samples",
        "16",
        "--data_file",
        str(train_file),
        "--eval_file",
        str(heldout),
        "--test_after_prune",
        "--save_model",
        "--finetune",
    ]
    argv += [f"--{k}={v}" for k, v in RECOVERY.items()] + [f"{k}={json.dumps(v)}" for k, v in QUIET.items()]
    prune_args = prune_parser.parse_args(argv)
    prune_args.func(prune_args)
    times["prune + recover (with 3 evaluations)"] = time.perf_counter() - tic
    results = json.loads((out / "prune" / "prune_results.json").read_text())
    rows = {r["model"]: r for r in results["results"]}

    if not args.no_control:
        tic = time.perf_counter()
        ctrl = control(base, train_file, out / "control")
        ppl = perplexity_of(ctrl, heldout)
        rows["control"] = {"model": "control", "parameters": rows["original"]["parameters"], **ppl}
        times["control (unpruned + same training)"] = time.perf_counter() - tic
    times["total"] = time.perf_counter() - start

    orig, pruned, rec = (rows[k]["perplexity"] for k in ("original", "pruned", "recovered"))
    print(
        f"\ntiny Shakespeare, held-out last 10% ({rows['original']['tokens']:,} tokens, blocks of {SEQ_LEN}), "
        f"BPE vocab {VOCAB}"
    )
    print(f"  {'model':<36}{'parameters':>12}{'perplexity':>12}")
    names = {
        "original": "original (pretrained here)",
        "pruned": "pruned 25% (attention + MLP)",
        "recovered": "recovered (full fine-tuning)",
        "control": "control: unpruned + same training",
    }
    for key, label in names.items():
        if key in rows:
            print(f"  {label:<36}{rows[key]['parameters']:>12,}{rows[key]['perplexity']:>12.3f}")
    won_back = (pruned - rec) / (pruned - orig) if pruned > orig else float("nan")
    print(f"  share of the pruning loss won back: {100 * won_back:.0f}%")
    print("  timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    summary = {"rows": rows, "won_back": won_back, "timings_s": times, "base_checkpoint": str(base)}
    (out / "bench_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
