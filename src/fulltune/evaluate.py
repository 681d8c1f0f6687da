"""Metrics over a data loader, streamed (memory does not grow with the data set): top-1/top-5, per-class
accuracy, macro-F1 and the confusion matrix for classifiers; token-level loss and perplexity for causal LMs.
Also `fulltune evaluate` over an exported checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fulltune.runtime import Precision


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def classification_metrics(
    model: nn.Module, loader: Any, num_classes: int, device: torch.device, precision: Precision, top_k: int = 0
) -> dict[str, Any]:
    """Streamed metrics, plus each example's gold and predicted class ("targets", "predictions"); with top_k > 0
    also each example's top-k class ids and probabilities ("top_k")."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, num_classes)
    targets, predictions, tops = [], [], []
    for batch in loader:
        batch = _to(batch, device)
        labels = batch.pop("labels")
        with precision.autocast():
            logits = model(**batch).logits.float()  # (batch, num_classes)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(-1)
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        top5 += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum()
        targets.append(labels)
        predictions.append(pred)  # (batch,) ints stay on the device: one copy to the host at the end
        if top_k > 0:
            tops.append(logits.softmax(-1).topk(min(top_k, num_classes), dim=-1))
    metrics = summarize_confusion(confusion.cpu(), int(top5), float(loss_sum))
    metrics["targets"] = torch.cat(targets).tolist() if targets else []
    metrics["predictions"] = torch.cat(predictions).tolist() if predictions else []
    if top_k > 0:
        metrics["top_k"] = [list(zip(i, v, strict=True)) for t in tops
                            for i, v in zip(t.indices.tolist(), t.values.tolist(), strict=True)]
    return metrics


def summarize_confusion(confusion: torch.Tensor, top5_correct: int, loss_sum: float) -> dict[str, Any]:
    """Metrics from a confusion matrix (rows: true class, columns: predicted class).

    macro_f1 follows scikit-learn's `f1_score(average="macro")`: the mean over the classes that occur among the
    labels or the predictions (a class predicted but absent from the labels counts, with F1 0). Top-5 accuracy is
    only reported where there are more than five classes (else it is always 1)."""
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    support = confusion.sum(1).double()
    predicted = confusion.sum(0).double()
    tp = confusion.diag().double()
    per_class = torch.where(support > 0, tp / support.clamp(min=1), torch.full_like(tp, float("nan")))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = (support > 0) | (predicted > 0)
    metrics: dict[str, Any] = {"accuracy": correct / max(total, 1)}
    if confusion.shape[0] > 5:
        metrics["top5_accuracy"] = top5_correct / max(total, 1)
    metrics.update({
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": loss_sum / max(total, 1),
        "examples": total,
        "per_class_accuracy": [None if math.isnan(v) else v for v in per_class.tolist()],
        "confusion_matrix": confusion.tolist(),
    })
    return metrics


@torch.no_grad()
def lm_metrics(model: nn.Module, loader: Any, device: torch.device, precision: Precision) -> dict[str, Any]:
    """Mean next-token NLL over all labelled tokens of the packed blocks, and its exp (perplexity)."""
    from fulltune.tasks import lm_loss

    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in loader:
        tokens += int((batch["labels"][:, 1:] != -100).sum())
        batch = _to(batch, device)
        with precision.autocast():
            loss, _ = lm_loss(model, batch, 0.0)
        nll += loss.double()
    mean = float(nll) / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens}


def write_classification_report(metrics: dict[str, Any], labels: list[str], out_dir: Path) -> None:
    """metrics.json, confusion_matrix.csv and confusion_matrix.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    named = {k: v for k, v in metrics.items() if k not in ("targets", "predictions", "top_k")}
    named["labels"] = labels
    named["per_class_accuracy"] = dict(zip(labels, metrics["per_class_accuracy"], strict=True))
    (out_dir / "metrics.json").write_text(json.dumps(named, indent=2))
    with open(out_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *labels])
        for name, row in zip(labels, metrics["confusion_matrix"], strict=True):
            w.writerow([name, *row])
    plot_confusion(metrics["confusion_matrix"], labels, out_dir / "confusion_matrix.png",
                   f"confusion matrix: {out_dir.name} ({metrics['examples']} examples)")


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "confusion matrix") -> None:
    from fulltune.report_html import plot_confusion_png

    plot_confusion_png(matrix, labels, path, title)


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


SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val", "val": "val", "test": "test", "train": "train"}


def canonical_split(split: str) -> str:
    """dev / val / valid / validation -> val; test; train. Anything else is a one-line error."""
    from fulltune.config import ConfigError

    if split not in SPLIT_ALIASES:
        raise ConfigError(f"--split '{split}': expected one of {', '.join(SPLIT_ALIASES)}")
    return SPLIT_ALIASES[split]


def default_output_dir(checkpoint: str | Path, split: str, file: str | None) -> Path:
    """<run>/eval/<checkpoint name>-<split or file stem>: beside the checkpoint, never inside it (an export is
    replaced when best/ improves, and is what gets shipped)."""
    ckpt = Path(checkpoint).resolve()
    return ckpt.parent / "eval" / f"{ckpt.name}-{Path(file).stem if file else split}"


def write_predictions(path: Path, inputs: list[str], metrics: dict[str, Any], labels: list[str]) -> None:
    """predictions.jsonl: one row per example (input text or image path, gold label, top-k labels with probability)."""
    with open(path, "w", encoding="utf-8") as f:
        for x, gold, pred, top in zip(inputs, metrics["targets"], metrics["predictions"], metrics["top_k"], strict=True):
            row = {"input": x, "label": labels[gold], "predicted": labels[pred], "correct": gold == pred,
                   "top_k": [{"label": labels[i], "probability": round(p, 6)} for i, p in top]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
    from fulltune.config import config_from_dict
    from fulltune.data import images as img
    from fulltune.data import text as txt
    from fulltune.data.text import DataError
    from fulltune.models import load_exported
    from fulltune.runtime import resolve_device, resolve_precision

    split = canonical_split(split)
    dev = resolve_device(device)
    bundle = load_exported(checkpoint, dev)
    cfg = config_from_dict(bundle.extra["fulltune_config"])
    precision = resolve_precision(cfg.hardware.mixed_precision, dev)
    labels = bundle.extra.get("labels")
    out = Path(output_dir) if output_dir else default_output_dir(checkpoint, split, file)
    if bundle.task == "causal_lm":
        from fulltune.perplexity import perplexity, tokenize_text_file

        found = [Path(data_dir) / f"{stem}.txt" for stem in txt.SPLIT_NAMES[split]] if data_dir else []
        path = file or next((str(f) for f in found if f.is_file()), str(found[0]) if found else None)
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
        roots = [Path(data_dir) / name for name in txt.SPLIT_NAMES[split]]
        root = next((r for r in roots if r.is_dir()), roots[0])
        folder = img.scan_split(root, labels)
        dataset: Any = img.ImageDataset(folder, bundle.image_spec, None)
        collate: Any = img.collate_images
        workers = 2
        inputs = [str(path) for path, _ in folder.samples]
    else:
        path = Path(file) if file else (txt.find_split_file(data_dir, split) if data_dir else None)
        if path is None or not path.is_file():
            raise DataError(f"no {split} table in '{data_dir}' (expected {split}.csv/.tsv/.jsonl) and no --file")
        examples = txt.read_examples(path, cfg.data)
        inputs = list(examples.texts)
        ids = txt.tokenize(bundle.tokenizer, examples.texts, cfg.data.max_length)
        dataset = txt.TokenizedDataset(ids, txt.label_ids(examples, labels))
        collate = txt.PadCollator(bundle.tokenizer.pad_token_id)
        workers = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    metrics = classification_metrics(bundle.model, loader, len(labels), dev, precision, top_k=min(5, len(labels)))
    write_classification_report(metrics, labels, out)
    write_predictions(out / "predictions.jsonl", inputs, metrics, labels)
    metrics["output_dir"] = str(out)
    metrics["labels"] = labels
    return metrics
