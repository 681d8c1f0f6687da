"""`fulltune evaluate`: the metrics of an exported checkpoint on a data split or file, written as metrics.json,
confusion_matrix.csv and confusion_matrix.png, and a short table for the terminal. The metrics themselves are
computed in `fulltune.metrics`.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fulltune.metrics import classification_metrics


def write_classification_report(metrics: dict[str, Any], labels: list[str], out_dir: Path) -> None:
    """metrics.json, confusion_matrix.csv and confusion_matrix.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    named = dict(metrics)
    named["labels"] = labels
    named["per_class_accuracy"] = dict(zip(labels, metrics["per_class_accuracy"], strict=True))
    (out_dir / "metrics.json").write_text(json.dumps(named, indent=2))
    with open(out_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *labels])
        for name, row in zip(labels, metrics["confusion_matrix"], strict=True):
            w.writerow([name, *row])
    plot_confusion(metrics["confusion_matrix"], labels, out_dir / "confusion_matrix.png")


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(2 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(metrics: dict[str, Any], labels: list[str] | None = None) -> str:
    """A short human-readable table for the terminal."""
    lines = []
    for key in ("accuracy", "top5_accuracy", "macro_f1", "loss", "perplexity", "tokens", "examples"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"  {key:<16}{v:.4f}" if isinstance(v, float) else f"  {key:<16}{v}")
    if labels and "per_class_accuracy" in metrics:
        lines.append("  per class:")
        per = metrics["per_class_accuracy"]
        values = per.values() if isinstance(per, dict) else per
        for name, acc in zip(labels, values, strict=True):
            lines.append(f"    {name:<22}{'n/a' if acc is None else f'{acc:.3f}'}")
    return "\n".join(lines)


def _canonical_split(split: str, file: str | None) -> str:
    """train / val / test; dev, valid and validation name val. Any other name is an error (unless --file)."""
    from fulltune.config import ConfigError
    from fulltune.data.text import SPLIT_NAMES

    for name, aliases in SPLIT_NAMES.items():
        if split in aliases:
            return name
    if file:
        return split  # only names the output folder
    choices = ", ".join(a for aliases in SPLIT_NAMES.values() for a in aliases)
    raise ConfigError(f"--split '{split}': not a split name; choose from {choices} (or give --file)")


def _split_folder(root: Path, split: str) -> Path:
    from fulltune.data.text import SPLIT_NAMES

    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return root / split


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | None = None,
    split: str = "test",
    output_dir: str | Path | None = None,
    file: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    block_size: int | None = None,
    stride: int | None = None,
) -> dict[str, Any]:
    """`fulltune evaluate`: metrics of an exported checkpoint on a split of a data folder (or one file)."""
    from fulltune.config import ConfigError, config_from_dict
    from fulltune.data import images as img
    from fulltune.data import text as txt
    from fulltune.errors import DataError
    from fulltune.models import load_exported
    from fulltune.runtime import resolve_device, resolve_precision

    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    split = _canonical_split(split, file)
    dev = resolve_device(device)
    bundle = load_exported(checkpoint, dev)
    cfg = config_from_dict(bundle.extra["fulltune_config"])
    precision = resolve_precision(cfg.hardware.mixed_precision, dev)
    labels = bundle.extra.get("labels")
    out = Path(output_dir) if output_dir else Path(checkpoint) / f"eval-{split}"
    if bundle.task == "causal_lm":
        from fulltune.perplexity import perplexity, tokenize_text_file

        path = file or (str(Path(data_dir) / f"{split}.txt") if data_dir else None)
        if path is None or not Path(path).is_file():
            raise DataError(f"perplexity needs a text file: --file PATH (got {path})")
        ids = tokenize_text_file(path, bundle.tokenizer)
        size = block_size or cfg.data.seq_len
        metrics = perplexity(bundle.model, ids, block_size=size, stride=stride, batch_size=max(1, batch_size // 4),
                             device=dev, autocast_ctx=precision.autocast)
        metrics["file"] = str(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    if bundle.task == "image_classification":
        if not data_dir:
            raise DataError("image evaluation needs --data_dir with <split>/<class>/ folders")
        folder = img.scan_split(_split_folder(Path(data_dir), split), labels)
        for skipped in folder.skipped:
            print(f"skipped unreadable image: {skipped}", file=sys.stderr)
        dataset: Any = img.ImageDataset(folder, bundle.image_spec, None)
        collate: Any = img.collate_images
        workers = 2
    else:
        path = Path(file) if file else (txt.find_split_file(data_dir, split) if data_dir else None)
        if path is None or not path.is_file():
            raise DataError(f"no {split} table in '{data_dir}' (expected {split}.csv/.tsv/.jsonl) and no --file")
        examples = txt.read_examples(path, cfg.data)
        ids = txt.tokenize(bundle.tokenizer, examples.texts, cfg.data.max_length)
        dataset = txt.TokenizedDataset(ids, txt.label_ids(examples, labels))
        collate = txt.PadCollator(bundle.tokenizer.pad_token_id)
        workers = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    metrics = classification_metrics(bundle.model, loader, len(labels), dev, precision)
    write_classification_report(metrics, labels, out)
    metrics["output_dir"] = str(out)
    metrics["labels"] = labels
    if bundle.task == "image_classification":
        metrics["skipped_images"] = len(folder.skipped)
    return metrics
