"""`fulltune evaluate`: the metrics of an exported checkpoint on a data split or file, written as metrics.json,
confusion_matrix.csv and confusion_matrix.png, and a short table for the terminal. The metrics themselves are
computed in `fulltune.eval.metrics`.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fulltune.config import ConfigError, config_from_dict
from fulltune.data import hf_eval, multilabel
from fulltune.data import images as img
from fulltune.data import text as txt
from fulltune.data.text import SPLIT_NAMES
from fulltune.errors import DataError
from fulltune.eval.metrics import classification_metrics, multi_label_metrics, regression_metrics
from fulltune.eval.perplexity import check_windows, file_perplexity, perplexity
from fulltune.eval.tagging import entity_table, evaluate_tokens
from fulltune.files.rundir import atomic_output, claim_output
from fulltune.model.exported import load_exported
from fulltune.report.html import plot_confusion_png
from fulltune.runtime.device import resolve_device, resolve_precision
from fulltune.speed.plan import set_threads


def write_classification_report(
    metrics: dict[str, Any], labels: list[str], out_dir: Path, title: str | None = None
) -> None:
    """metrics.json, confusion_matrix.csv and confusion_matrix.png in out_dir (`title`: the name the plot shows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    named = {k: v for k, v in metrics.items() if k not in ("targets", "predictions", "top_k", "skipped", "positions")}
    named["labels"] = labels
    named["per_class_accuracy"] = dict(zip(labels, metrics["per_class_accuracy"], strict=True))
    (out_dir / "metrics.json").write_text(json.dumps(named, indent=2))
    with open(out_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *labels])
        for name, row in zip(labels, metrics["confusion_matrix"], strict=True):
            w.writerow([name, *row])
    plot_confusion(
        metrics["confusion_matrix"],
        labels,
        out_dir / "confusion_matrix.png",
        f"confusion matrix: {title or out_dir.name} ({metrics['examples']} examples)",
    )


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "confusion matrix") -> None:
    plot_confusion_png(matrix, labels, path, title)


def format_table(metrics: dict[str, Any], labels: list[str] | None = None) -> str:
    """A short human-readable table for the terminal."""
    lines = []
    keys = ("f1", "precision", "recall", "micro_f1", "micro_precision", "micro_recall", "subset_accuracy", "accuracy")
    keys += ("top5_accuracy", "macro_f1", "mse", "mae", "pearson", "spearman", "loss", "perplexity")
    for key in (*keys, "tokens", "examples"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"  {key:<16}{v:.4f}" if isinstance(v, float) else f"  {key:<16}{v}")
    if "per_entity" in metrics:
        lines.append(entity_table(metrics))
    if labels and "per_class_accuracy" in metrics:
        lines.append("  per class:")
        per = metrics["per_class_accuracy"]
        values = per.values() if isinstance(per, dict) else per
        for name, acc in zip(labels, values, strict=True):
            lines.append(f"    {name:<22}{'n/a' if acc is None else f'{acc:.3f}'}")
    if "per_label" in metrics:  # multi-label
        lines.append(f"  per label:{'':<14}{'F1':>6}{'support':>9}{'threshold':>11}")
        for name, row in metrics["per_label"].items():
            lines.append(f"    {name:<22}{row['f1']:>6.3f}{row['support']:>9}{row['threshold']:>11.2f}")
    return "\n".join(lines)


def _canonical_split(split: str, file: str | None) -> str:
    """train / val / test; dev, valid and validation name val. Any other name is an error (unless --file)."""

    for name, aliases in SPLIT_NAMES.items():
        if split in aliases:
            return name
    if file:
        return split  # only names the output folder
    choices = ", ".join(a for aliases in SPLIT_NAMES.values() for a in aliases)
    raise ConfigError(f"--split '{split}': not a split name; choose from {choices} (or give --file)")


def _split_folder(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return root / split


def default_output_dir(checkpoint: str | Path, split: str, file: str | None) -> Path:
    """<run>/eval/<checkpoint name>-<split or file stem>: beside the checkpoint, never inside it (an export is
    replaced when best/ improves, and is what gets shipped)."""
    ckpt = Path(checkpoint).resolve()
    return ckpt.parent / "eval" / f"{ckpt.name}-{Path(file).stem if file else split}"


def _source(checkpoint: str | Path, data_dir: str | None, split: str, file: str | None, dataset: Any) -> dict:
    """What an evaluation scored, as its metrics.json records it ("evaluated")."""
    where = {"data_dir": data_dir, "file": file}
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        **{k: str(Path(v).resolve()) if v else None for k, v in where.items()},
        "split": split,
        "dataset": dataset,
    }


def _evaluated(out: Path) -> dict | None:
    """The "evaluated" record of an earlier evaluation in `out` ({} when it has none), None when there is none."""
    try:
        return json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("evaluated") or {}
    except (OSError, ValueError, AttributeError):
        return None


def _choose_output(output_dir: str | Path | None, default: Path, source: dict) -> Path:
    """The evaluation folder: --output_dir, else `default`; an earlier evaluation of other data there is never
    replaced unasked (the default moves on to <name>-2, -3, ...), and a replacement is said."""
    out = Path(output_dir) if output_dir else default
    n = 1
    while not output_dir and _evaluated(out) not in (None, source):
        n += 1
        out = default.with_name(f"{default.name}-{n}")
    earlier = _evaluated(out)
    if earlier is not None:
        what = earlier.get("file") or earlier.get("dataset") or earlier.get("split") or "unrecorded data"
        print(f"replacing the earlier evaluation in {out} (of {what})", file=sys.stderr)
    elif n > 1:
        print(f"{default} holds an evaluation of other data: this one goes to {out}", file=sys.stderr)
    return out


def write_predictions(path: Path, inputs: list[str], metrics: dict[str, Any], labels: list[str]) -> None:
    """predictions.jsonl: one row per example (input text or image path, gold label, top-k labels with probability)."""
    with open(path, "w", encoding="utf-8") as f:
        for x, gold, pred, top in zip(
            inputs, metrics["targets"], metrics["predictions"], metrics["top_k"], strict=True
        ):
            row = {
                "input": x,
                "label": labels[gold],
                "predicted": labels[pred],
                "correct": gold == pred,
                "top_k": [{"label": labels[i], "probability": round(p, 6)} for i, p in top],
            }
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
    dataset_name: str | None = None,
) -> dict[str, Any]:
    """`fulltune evaluate`: metrics of an exported checkpoint on a split of a data folder (or one file), or on a
    split of a `datasets` source: `dataset_name`, else the run's data.dataset_name when no folder or file is given."""

    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    check_windows(block_size, stride)  # before loading anything; against the run's seq_len below
    dev = resolve_device(device, "--device")
    bundle = load_exported(checkpoint, dev)
    cfg = config_from_dict(bundle.extra["fulltune_config"])
    set_threads(cfg, dev)  # on a CPU: the CPUs free of other work, as training decides
    if bundle.task == "causal_lm":
        check_windows(block_size or cfg.data.seq_len, stride)
    hub = None
    if dataset_name or (cfg.data.dataset_name and not data_dir and not file):
        hub = hf_eval.open_split(cfg, split, dataset_name)
    else:
        split = _canonical_split(split, file)
    precision = resolve_precision(cfg.hardware.mixed_precision, dev)
    labels = bundle.extra.get("labels")
    source = _source(checkpoint, data_dir, split, file, hub.shown if hub is not None else None)
    out = _choose_output(output_dir, default_output_dir(checkpoint, split, file), source)
    claim_output(out, "evaluate", inputs=(checkpoint, data_dir, file))
    if bundle.task == "causal_lm":
        args = (bundle, cfg, hub, data_dir, split, file, out, batch_size, dev, precision, block_size, stride, source)
        return _perplexity(*args)
    if bundle.task == "multi_label_classification":
        run = dict(batch_size=batch_size, device=dev, precision=precision, evaluated=source)
        metrics = _multi_label(bundle, cfg, hub, (data_dir, split, file), out, run)
        return metrics | ({"dataset": hub.shown} if hub is not None else {})
    if bundle.task == "token_classification":
        if hub is not None:
            raise ConfigError("token_classification evaluates a CoNLL or JSONL file: give --file or --data_dir")
        return evaluate_tokens(bundle, cfg, data_dir, split, file, out, batch_size, dev, precision, source)
    dataset, collate, workers, inputs, skipped = _classification_inputs(bundle, cfg, hub, data_dir, split, file, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    if bundle.task == "text_regression":
        return _regression(bundle, loader, inputs, out, dev, precision, source, hub, cfg.training.loss)
    metrics = classification_metrics(bundle.model, loader, len(labels), dev, precision, top_k=min(5, len(labels)))
    inputs = [inputs[i] for i in metrics["positions"]]  # an image that fails to decode is skipped, counted
    metrics["evaluated"] = source
    with atomic_output(out, "evaluate") as tmp:
        write_classification_report(metrics, labels, tmp, title=out.name)
        write_predictions(tmp / "predictions.jsonl", inputs, metrics, labels)
    metrics["output_dir"] = str(out)
    metrics["labels"] = labels
    if hub is not None:
        metrics["dataset"] = hub.shown
    if bundle.task == "image_classification":
        metrics["skipped_images"] = skipped + len(metrics["skipped"])
    return metrics


def _regression(
    bundle: Any,
    loader: Any,
    inputs: list[str],
    out: Path,
    dev: Any,
    precision: Any,
    evaluated: dict,
    hub: Any,
    loss: str,
) -> dict[str, Any]:
    """A regression's metrics (MSE, MAE, Pearson, Spearman) as metrics.json, and predictions.jsonl: each input with
    its gold and predicted number."""
    metrics = regression_metrics(bundle.model, loader, dev, precision, loss)
    metrics["evaluated"] = evaluated
    with atomic_output(out, "evaluate") as tmp:
        named = {k: v for k, v in metrics.items() if k not in ("targets", "predictions")}
        (tmp / "metrics.json").write_text(json.dumps(named, indent=2))
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for x, gold, pred in zip(inputs, metrics["targets"], metrics["predictions"], strict=True):
                f.write(json.dumps({"input": x, "label": gold, "predicted": pred}, ensure_ascii=False) + "\n")
    metrics["output_dir"] = str(out)
    if hub is not None:
        metrics["dataset"] = hub.shown
    return metrics


def _perplexity(
    bundle: Any,
    cfg: Any,
    hub: Any,
    data_dir: str | None,
    split: str,
    file: str | None,
    out: Path,
    batch_size: int,
    dev: Any,
    precision: Any,
    block_size: int | None,
    stride: int | None,
    evaluated: dict,
) -> dict[str, Any]:
    """Perplexity of a causal LM on a text or JSONL file (or a dataset split, each row a record), as
    `eval.perplexity` defines it."""

    block = block_size or cfg.data.seq_len
    kwargs = dict(stride=stride, batch_size=max(1, batch_size // 4), device=dev, autocast_ctx=precision.autocast)
    if hub is not None:
        ids, labels = hf_eval.lm_token_ids(cfg, hub, bundle.tokenizer)
        try:
            metrics = perplexity(bundle.model, ids, block, labels=labels, **kwargs)
        except ValueError:
            raise DataError(f"{hub.shown}: {ids.numel()} token(s), too few to measure perplexity") from None
        source = {"dataset": hub.shown}
    else:
        stems = txt.SPLIT_NAMES[split] if data_dir else ()
        found = [Path(data_dir) / f"{stem}{ext}" for stem in stems for ext in (".txt", ".jsonl")]
        path = file or next((str(f) for f in found if f.is_file()), str(found[0]) if found else None)
        if path is None or not Path(path).is_file():
            raise DataError(f"perplexity needs a text or JSONL file: --file PATH (got {path})")
        metrics = file_perplexity(bundle.model, bundle.tokenizer, path, cfg.data, block, **kwargs)
        source = {"file": str(path)}
    metrics.update(source)
    metrics["evaluated"] = evaluated
    with atomic_output(out, "evaluate") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _split_table(data_dir: str | None, split: str, file: str | None) -> Path:
    """The table to score: --file, else the split's table in the data folder."""
    path = Path(file) if file else (txt.find_split_file(data_dir, split) if data_dir else None)
    if path is None or not path.is_file():
        raise DataError(f"no {split} table in '{data_dir}' (expected {split}.csv/.tsv/.jsonl) and no --file")
    return path


def _multi_label(
    bundle: Any, cfg: Any, hub: Any, where: tuple[str | None, str, str | None], out: Path, run: dict[str, Any]
) -> dict[str, Any]:
    """A multi-label checkpoint's metrics at its thresholds (thresholds.json beside the weights, else
    eval.threshold): metrics.json with per-label F1, precision, recall, support and threshold, and
    predictions.jsonl (each example's gold labels and the labels predicted, with their probabilities). `run`:
    batch_size, device, precision and the "evaluated" record."""
    labels = bundle.extra["labels"]
    examples = multilabel.hub_examples(hub.hub, "train", cfg) if hub is not None else None
    examples = examples or multilabel.read_examples(_split_table(*where), cfg.data)
    dataset = multilabel.encoded(examples, labels, bundle.tokenizer, cfg.data.max_length)
    collate = txt.PadCollator(bundle.tokenizer.pad_token_id, label_dtype=torch.float32)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=collate, batch_size=run["batch_size"])
    thresholds = multilabel.read_thresholds(Path(bundle.source), labels, cfg.eval.threshold)
    metrics = multi_label_metrics(bundle.model, loader, thresholds, run["device"], run["precision"])
    prob, target = metrics.pop("probabilities"), metrics.pop("targets")
    columns = [metrics.pop(f"per_label_{k}") for k in ("f1", "precision", "recall", "support")]
    per_label = zip(*columns, thresholds, strict=True)
    metrics["per_label"] = {
        name: dict(zip(("f1", "precision", "recall", "support", "threshold"), row, strict=True))
        for name, row in zip(labels, per_label, strict=True)
    }
    metrics.pop("thresholds")
    metrics["evaluated"] = run["evaluated"]
    with atomic_output(out, "evaluate") as tmp:
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "labels": labels}, indent=2))
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for text, p, t in zip(examples.texts, prob.tolist(), target.tolist(), strict=True):
                above = sorted(((v, i) for i, v in enumerate(p) if v >= thresholds[i]), reverse=True)
                row = {
                    "input": text,
                    "labels": [labels[i] for i, v in enumerate(t) if v > 0.5],
                    "predicted": [{"label": labels[i], "probability": round(v, 6)} for v, i in above],
                }
                row["correct"] = sorted(row["labels"]) == sorted(x["label"] for x in row["predicted"])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics |= {"output_dir": str(out), "labels": labels, "written": ["metrics.json", "predictions.jsonl"]}
    return metrics


def _classification_inputs(
    bundle: Any, cfg: Any, hub: Any, data_dir: str | None, split: str, file: str | None, labels: list[str]
) -> tuple[Any, Any, int, list[str], int]:
    """(dataset, collate, workers, input names, skipped images) of the split to classify."""

    if bundle.task == "image_classification":
        if hub is not None:
            dataset, inputs = hf_eval.image_dataset(cfg, hub, labels, bundle.image_spec)
            return dataset, img.collate_images, 2, inputs, 0
        if not data_dir:
            raise DataError("image evaluation needs --data_dir with <split>/<class>/ folders")
        folder = img.scan_split(_split_folder(Path(data_dir), split), labels)
        for skipped in folder.skipped:
            print(f"skipped unreadable image: {skipped}", file=sys.stderr)
        dataset = img.ImageDataset(folder, bundle.image_spec, None)
        return dataset, img.collate_images, 2, [str(path) for path, _ in folder.samples], len(folder.skipped)
    collate, regression = txt.PadCollator(bundle.tokenizer.pad_token_id), bundle.task == "text_regression"
    if hub is not None:
        dataset, texts = hf_eval.text_dataset(cfg, hub, labels, bundle.tokenizer, regression)
        return dataset, collate, 0, texts, 0
    examples = txt.read_examples(_split_table(data_dir, split, file), cfg.data)  # the run's columns (a pair's two)
    dataset = txt.encoded_dataset(examples, labels, bundle.tokenizer, cfg.data.max_length, regression)
    return dataset, collate, 0, list(examples.texts), 0
