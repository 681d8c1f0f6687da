"""`fulltune predict`: top-k labels for images or texts (or sentence pairs), or a regression's number, one JSON
line per input; generated text for causal LMs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fulltune.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("predict", help="top-k labels for images or texts, or generated text")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or export folder (e.g. RUN/best)")
    p.add_argument("--image", help="an image file or a folder of images")
    p.add_argument(
        "--text",
        action="append",
        help="a text to classify (give --text again for more); a tagger splits it into words on whitespace",
    )
    p.add_argument(
        "--text_pair",
        action="append",
        help="sentence pairs: the second text of the --text before it (one --text_pair per --text)",
    )
    p.add_argument(
        "--file",
        help="a CSV/TSV/JSONL table (the run's text column; a causal LM's prompt column) or a .txt file of one text "
        "(or prompt) per line; a tagger also reads a CoNLL (.conll) or JSONL file of word lists",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="causal LM: a prompt to continue, framed as training framed its records (give --prompt again for more)",
    )
    p.add_argument(
        "--chat",
        action="append",
        help="causal LM trained on conversations: a user message to answer, rendered with the export's chat "
        "template (give --chat again for more; --file takes a JSONL of messages)",
    )
    p.add_argument(
        "--dataset_name",
        help="a `datasets` hub id or save_to_disk folder: predict every row of --split (its text or image column)",
    )
    p.add_argument("--split", default="test", help="with --dataset_name: the split (train, val, test or its own name)")
    p.add_argument("--top_k", type=int, default=5, help="labels per input (a multi-label model: all above threshold)")
    p.add_argument(
        "--max_new_tokens",
        type=int,
        default=64,
        help="causal LM: at most this many tokens (>= 1); stops at the end token",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="causal LM: 0 is greedy decoding")
    p.add_argument("--top_p", type=float, default=1.0, help="causal LM: nucleus sampling mass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def _print(row: dict[str, Any]) -> None:
    print(json.dumps(row, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    from fulltune.eval.predict import chat_generate, chat_inputs, generate, image_paths, is_chat_file, text_inputs
    from fulltune.model.exported import load_exported
    from fulltune.runtime.device import resolve_device

    bundle = load_exported(args.checkpoint, resolve_device(args.device, "--device"))
    if args.dataset_name:
        return _predict_dataset(bundle, args)
    data = (bundle.extra.get("fulltune_config") or {}).get("data") or {}  # the run's columns and encoding
    if bundle.task == "causal_lm" and (args.chat or is_chat_file(args.file, data)):
        for messages in chat_inputs(args.chat, args.file, data):
            text = chat_generate(bundle, messages, args.max_new_tokens, args.temperature, args.top_p)
            _print({"messages": messages, "generated": text})
        return 0
    if bundle.task == "causal_lm":
        for prompt in text_inputs((args.prompt or []) + (args.text or []), args.file, data, causal_lm=True):
            text = generate(bundle, prompt, args.max_new_tokens, args.temperature, args.top_p)
            _print({"prompt": prompt, "generated": text})
        return 0
    if bundle.task == "token_classification":
        from fulltune.config import config_from_dict
        from fulltune.eval.tagging import sentence_inputs, tag_sentences, tagged_row

        sentences = sentence_inputs(args.text, args.file, config_from_dict(bundle.extra["fulltune_config"]).data)
        for words, tags in zip(sentences, tag_sentences(bundle, sentences), strict=True):
            _print(tagged_row(words, tags))
        return 0
    if bundle.task == "image_classification":
        if not args.image:
            raise ConfigError("this checkpoint classifies images: give --image PATH (file or folder)")
        inputs: list = image_paths(args.image)
        shown = [str(p) for p in inputs]
    else:
        inputs = text_inputs(args.text, args.file, data, text_pairs=args.text_pair)
        shown = inputs
    return _print_rows(bundle, inputs, shown, args, skip_unreadable=bool(args.image) and Path(args.image).is_dir())


def _input_row(name: Any) -> dict[str, Any]:
    """How a line names its input: {"input": text} or, for a sentence pair, {"input": first, "text_pair": second}."""
    return {"input": name[0], "text_pair": name[1]} if isinstance(name, tuple) else {"input": name}


def _print_rows(bundle: Any, inputs: list, shown: list, args: argparse.Namespace, skip_unreadable: bool) -> int:
    """One JSON line per input: a regression's "prediction" (a number), a multi-label model's every label above its
    threshold, else the top-k labels with probabilities (a folder's image that fails to decode is skipped)."""
    from fulltune.eval.predict import classify, multi_label_rows, regress

    if bundle.task == "multi_label_classification":
        for row in multi_label_rows(bundle, inputs):
            _print(row)
        return 0
    if bundle.task == "text_regression":
        for name, value in zip(shown, regress(bundle, inputs), strict=True):
            _print(_input_row(name) | {"prediction": round(value, 6)})
        return 0
    for name, top in zip(shown, classify(bundle, inputs, args.top_k, skip_unreadable=skip_unreadable), strict=True):
        if top is None:
            continue
        _print(_input_row(name) | {"top_k": [{"label": lb, "probability": round(p, 4)} for lb, p in top]})
    return 0


def _predict_dataset(bundle: Any, args: argparse.Namespace) -> int:
    """One line per row of a dataset split, read with the run's columns."""
    from fulltune.config import config_from_dict
    from fulltune.data import hf_eval
    from fulltune.eval.predict import generate

    cfg = config_from_dict(bundle.extra["fulltune_config"])
    split = hf_eval.open_split(cfg, args.split, args.dataset_name)
    inputs, shown = hf_eval.predict_inputs(cfg, split, bundle.task)
    if bundle.task == "causal_lm":
        for prompt in inputs:
            text = generate(bundle, prompt, args.max_new_tokens, args.temperature, args.top_p)
            _print({"prompt": prompt, "generated": text})
        return 0
    return _print_rows(bundle, inputs, shown, args, skip_unreadable=True)
