"""Metrics over a data loader, streamed (memory does not grow with the data set): top-1/top-5, per-class
accuracy, macro-F1 and the confusion matrix for classifiers; micro/macro/per-label F1 at thresholds for
multi-label classifiers; MSE, MAE, Pearson and Spearman for a regression (perplexity for causal LMs:
`eval.perplexity`).
The trainer's validation and the `evaluate` command both compute them here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fulltune.data.tokens import IGNORE
from fulltune.eval.losses import summed_regression_loss
from fulltune.runtime.device import Precision, to_device


@torch.no_grad()
def classification_metrics(
    model: nn.Module, loader: Any, num_classes: int, device: torch.device, precision: Precision, top_k: int = 0
) -> dict[str, Any]:
    """Streamed metrics, plus each example's gold and predicted class ("targets", "predictions"); with top_k > 0
    also each example's top-k class ids and probabilities ("top_k"). Examples labelled SKIPPED_LABEL (-100: an image
    that failed to decode) are not scored: their positions in the loader's order are listed in "skipped", those of
    the scored ones in "positions"."""
    model.eval()
    skipped: list[int] = []
    seen = 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, num_classes)
    targets, predictions, tops = [], [], []
    for batch in loader:
        keep = batch["labels"] >= 0  # read on the host, before the copy: no device sync per batch
        dropped = (~keep).nonzero().flatten().tolist()
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with precision.autocast():
            logits = model(**batch).logits.float()  # (batch, num_classes)
        if dropped:
            skipped.extend(seen + i for i in dropped)
            keep = keep.to(device)
            logits, labels = logits[keep], labels[keep]
        seen += len(keep)
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
    metrics["skipped"] = skipped
    dropped = set(skipped)
    metrics["positions"] = [i for i in range(seen) if i not in dropped]  # loader positions of "targets"
    if top_k > 0:
        metrics["top_k"] = [
            list(zip(i, v, strict=True))
            for t in tops
            for i, v in zip(t.indices.tolist(), t.values.tolist(), strict=True)
        ]
    return metrics


@torch.no_grad()
def regression_metrics(
    model: nn.Module, loader: Any, device: torch.device, precision: Precision, loss: str = "mse"
) -> dict[str, Any]:
    """A regression's metrics (`summarize_regression`, "loss" the run's training.loss `loss`) over the loader, with
    each example's gold and predicted number ("targets", "predictions"); its one output is the prediction."""
    model.eval()
    targets, predictions = [], []
    for batch in loader:
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with precision.autocast():
            out = model(**batch).logits.float().squeeze(-1)  # (batch,)
        targets.append(labels.float())
        predictions.append(out)
    truth = torch.cat(targets).double().cpu() if targets else torch.zeros(0, dtype=torch.float64)
    pred = torch.cat(predictions).double().cpu() if predictions else torch.zeros(0, dtype=torch.float64)
    return summarize_regression(pred.tolist(), truth.tolist(), loss)


def summarize_regression(predictions: list[float], targets: list[float], loss: str = "mse") -> dict[str, Any]:
    """MSE, MAE, "loss" (the mean of training.loss `loss`, MSE or Huber: what training minimises, from losses.py
    `summed_regression_loss`), and Pearson's and Spearman's correlations as scipy.stats computes them. A correlation
    is 0.0 where the predictions or the targets do not vary (scipy gives NaN there: no correlation to measure, and a
    NaN would stop best/ from ever improving)."""
    from scipy import stats  # scipy only where a regression is scored

    pred, truth = torch.tensor(predictions, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    n = len(predictions)
    error = pred - truth
    mse = float((error**2).mean()) if n else 0.0
    varies = n > 1 and float(pred.std()) > 0 and float(truth.std()) > 0
    pearson = float(stats.pearsonr(predictions, targets).statistic) if varies else 0.0
    spearman = float(stats.spearmanr(predictions, targets).statistic) if varies else 0.0
    return {
        "mse": mse,
        "mae": float(error.abs().mean()) if n else 0.0,
        "pearson": pearson if math.isfinite(pearson) else 0.0,
        "spearman": spearman if math.isfinite(spearman) else 0.0,
        "loss": float(summed_regression_loss(loss, pred, truth)) / n if n else 0.0,
        "examples": n,
        "targets": list(targets),
        "predictions": list(predictions),
    }


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
    metrics.update(
        {
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "loss": loss_sum / max(total, 1),
            "examples": total,
            "per_class_accuracy": [None if math.isnan(v) else v for v in per_class.tolist()],
            "confusion_matrix": confusion.tolist(),
        }
    )
    return metrics


@torch.no_grad()
def multi_label_metrics(
    model: nn.Module, loader: Any, thresholds: list[float], device: torch.device, precision: Precision
) -> dict[str, Any]:
    """Multi-label metrics at per-label `thresholds` on the sigmoid (`multi_label_scores`), the mean BCE loss (as
    `losses.multi_label_loss` averages it), and each example's label probabilities and 0/1 targets ("probabilities",
    "targets": (examples, labels) tensors on the host, for tuning thresholds and writing predictions)."""
    model.eval()
    probs, targets = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        batch = to_device(batch, device)
        labels = batch.pop("labels").float()  # (batch, num_labels) of 0/1
        with precision.autocast():
            logits = model(**batch).logits.float()  # (batch, num_labels)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        loss_sum += bce.double() / logits.shape[-1]
        probs.append(logits.sigmoid())
        targets.append(labels)
    prob = torch.cat(probs).cpu() if probs else torch.zeros(0, len(thresholds))
    target = torch.cat(targets).cpu() if targets else torch.zeros(0, len(thresholds))
    metrics = multi_label_scores(prob, target, thresholds)
    metrics["loss"] = float(loss_sum) / max(len(prob), 1)
    metrics["probabilities"], metrics["targets"] = prob, target
    return metrics


def multi_label_scores(prob: torch.Tensor, target: torch.Tensor, thresholds: list[float]) -> dict[str, Any]:
    """Micro and macro F1 (and per-label F1, precision, recall, support) of `prob` >= each label's threshold
    against 0/1 `target`, both (examples, labels). They follow scikit-learn's `f1_score` on multi-hot rows: micro
    pools every label's counts; macro is the mean over all labels, a label never true nor predicted counting 0
    (zero_division=0); `subset_accuracy` is the share of examples whose whole label set is right."""
    pred = prob >= torch.tensor(thresholds, dtype=prob.dtype)  # (examples, labels)
    truth = target > 0.5
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0).double()

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    micro = ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {
        "micro_f1": float(micro),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "micro_precision": float(ratio(tp.sum(), tp.sum() + fp.sum())),
        "micro_recall": float(ratio(tp.sum(), tp.sum() + fn.sum())),
        "subset_accuracy": float((pred == truth).all(-1).double().mean()) if len(pred) else 0.0,
        "examples": len(prob),
        "per_label_f1": f1.tolist(),
        "per_label_precision": ratio(tp, tp + fp).tolist(),
        "per_label_recall": ratio(tp, tp + fn).tolist(),
        "per_label_support": truth.sum(0).tolist(),
        "thresholds": [float(t) for t in thresholds],
    }


THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(1, 20)]
"""The thresholds tuning tries per label: 0.05, 0.10, ..., 0.95."""


def tune_thresholds(prob: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Each label's threshold from THRESHOLD_GRID with the best F1 on (examples, labels) `prob` vs `target`; among
    equal F1s the one nearest 0.5 (so a label without positives keeps 0.5)."""
    grid = torch.tensor(THRESHOLD_GRID, dtype=prob.dtype)
    pred = prob[None] >= grid[:, None, None]  # (grid, examples, labels)
    truth = (target > 0.5)[None]
    tp = (pred & truth).sum(1).double()
    wrong = (pred ^ truth).sum(1).double()  # false positives + false negatives
    f1 = torch.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong).clamp(min=1), torch.zeros_like(tp))  # (grid, labels)
    # Among the grid points with the best F1, the one nearest 0.5 (the lower one of two as near).
    distance = (grid[:, None].double() - 0.5).abs().expand_as(f1).clone()
    distance[f1 < f1.max(0).values] = float("inf")
    return [THRESHOLD_GRID[i] for i in distance.argmin(0).tolist()]


def token_metrics(
    model: nn.Module, loader: Any, labels: list[str], device: torch.device, precision: Precision
) -> dict[str, Any]:
    """Token classification: entity-level precision, recall and F1 (micro over entities) and each entity type's, as
    `seqeval` computes them, and the accuracy over words; each word scored at its first sub-token (labels -100
    elsewhere). Also the loss per word, and each sentence's gold and predicted tags ("targets", "predictions")."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets: list[list[str]] = []
    predictions: list[list[str]] = []
    for batch in loader:
        batch = to_device(batch, device)
        gold = batch.pop("labels")  # (batch, seq), -100 off the words' first sub-tokens
        with precision.autocast():
            logits = model(**batch).logits.float()  # (batch, seq, num_tags)
        loss_sum += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), gold.flatten(), ignore_index=IGNORE, reduction="sum"
        ).double()
        pred, gold, keep = logits.argmax(-1).tolist(), gold.tolist(), (gold != IGNORE).tolist()
        for p_row, g_row, k_row in zip(pred, gold, keep, strict=True):
            targets.append([labels[g] for g, k in zip(g_row, k_row, strict=True) if k])
            predictions.append([labels[p] for p, k in zip(p_row, k_row, strict=True) if k])
    metrics = entity_scores(targets, predictions)
    metrics["loss"] = float(loss_sum) / max(metrics["tokens"], 1)
    metrics["targets"], metrics["predictions"] = targets, predictions
    return metrics


def entity_scores(targets: list[list[str]], predictions: list[list[str]]) -> dict[str, Any]:
    """seqeval's entity-level micro precision/recall/F1 and its per-type report, and the word accuracy."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    words = sum(len(t) for t in targets)
    if not words:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 0.0, "examples": len(targets), "tokens": 0}
    report = classification_report(targets, predictions, output_dict=True, zero_division=0)
    per_entity = {
        name: {k.replace("f1-score", "f1"): int(v) if k == "support" else float(v) for k, v in row.items()}
        for name, row in report.items()
        if name not in ("micro avg", "macro avg", "weighted avg")
    }
    return {
        "f1": float(f1_score(targets, predictions, zero_division=0)),
        "precision": float(precision_score(targets, predictions, zero_division=0)),
        "recall": float(recall_score(targets, predictions, zero_division=0)),
        "accuracy": float(accuracy_score(targets, predictions)),
        "examples": len(targets),
        "tokens": words,
        "per_entity": per_entity,
    }


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics only (no matrices or per-class lists), for logs and summaries."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def improves(
    value: float,
    best: float | None,
    higher_is_better: bool,
    min_delta: float = 0.0,
    loss: float | None = None,
    best_loss: float | None = None,
) -> bool:
    """Whether a validation value beats the best so far by more than `min_delta` (the first one always does).

    A tie on the value (accuracy 1.0 twice, say) goes to the lower validation `loss`: the later weights have
    learned more although the metric cannot show it. When the metric is the loss itself, a tie stays a tie.
    """
    if best is None:
        return True
    if value == best and loss is not None and best_loss is not None:
        return loss < best_loss
    return value > best + min_delta if higher_is_better else value < best - min_delta
