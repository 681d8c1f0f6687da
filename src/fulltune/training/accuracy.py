"""Training-set accuracy per epoch, from the logits the training step already computed (no extra forward).

The CLIP fine-tuning guide watches the gap between training and validation accuracy to spot overfitting. The counts
stay on the device during the epoch (no host sync per step); `take` reads them once at the epoch's end. Causal LMs,
regressions and multi-label classifiers get none.
Dropout and augmentation are on in training, so this is the accuracy of the batches as trained on, the usual figure.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainAccuracy:
    """Running count of correct top-1 predictions over the training batches of an epoch."""

    def __init__(self, task_name: str, device: torch.device) -> None:
        self.enabled = task_name not in ("causal_lm", "multi_label_classification", "text_regression")  # no top-1
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        labels = batch["labels"]  # (batch,), or (batch, seq) for token classification: -100 is not scored
        with torch.no_grad():
            scored = labels >= 0
            self.correct += ((logits.detach().argmax(-1) == labels) & scored).sum()
            self.seen += scored.sum()

    def take(self) -> float | None:
        """The epoch's accuracy (one host sync), then reset; None when nothing was counted."""
        if not self.enabled:
            return None
        seen = int(self.seen)
        value = int(self.correct) / seen if seen else None
        self.correct.zero_()
        self.seen.zero_()
        return value


def log_train_accuracy(log: Any, state: Any, value: float | None) -> None:
    """One log line per epoch, a metrics.jsonl row (split "train") and a TensorBoard scalar (train/accuracy)."""
    if value is None or not log.enabled:
        return
    step, epoch = state.optimizer_step, state.epoch
    log.info(f"[train] step {step} epoch {epoch}: accuracy {value:.4f} (training batches as trained on)")
    log._record({"step": step, "epoch": epoch, "split": "train", "accuracy": value})
    if log.writer:
        log.writer.add_scalar("train/accuracy", value, step)
