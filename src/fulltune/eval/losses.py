"""The losses training and evaluation share (classification cross-entropy, multi-label BCE, regression MSE or
Huber, the causal-LM token loss) and what a batch counts as (examples or tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fulltune.data import lm


def classification_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch and its logits (batch, num_classes)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum", label_smoothing=label_smoothing)
    return loss, logits


def multi_label_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy with logits, averaged over the labels and summed over the batch (so the mean per
    example is what transformers' own multi_label_classification loss gives); labels (batch, num_labels) of 0/1,
    smoothed towards 1/2 by label_smoothing."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits  # (batch, num_labels)
    target = batch["labels"].float() * (1 - label_smoothing) + label_smoothing / 2
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / logits.shape[-1]
    return loss, logits


def summed_regression_loss(name: str, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A regression's loss `name` (training.loss), summed over the examples: "mse", squared error; "huber", Huber
    with delta 1 (squared below an error of 1, linear above). Training minimises it and the validation loss reports
    it, so the two curves measure one thing. Computed in the inputs' dtype."""
    if name == "huber":
        return F.huber_loss(predictions, targets, reduction="sum", delta=1.0)
    return F.mse_loss(predictions, targets, reduction="sum")


def _regression(name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return summed_regression_loss(name, logits.float().squeeze(-1), batch["labels"].float()), logits


def mse_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed squared error of a regression's one output (logits (batch, 1)) against its float labels."""
    return _regression("mse", model, batch)


def huber_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed Huber loss (delta 1) of a regression's one output against its float labels."""
    return _regression("huber", model, batch)


REGRESSION_LOSSES = {"mse": mse_loss, "huber": huber_loss}
"""training.loss -> a regression's loss function."""


def lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens (labels -100 are skipped)."""
    # use_cache=False: no key/value cache is built in training (a pruned folder's config may still ask for one).
    # position_ids: packed conversations restart at 0 each (data.packing); absent, the model counts 0..seq-1.
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    loss = F.cross_entropy(
        shift_logits, shift_labels, reduction="sum", ignore_index=lm.IGNORE, label_smoothing=label_smoothing
    )
    return loss, logits


def token_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the tagged sub-tokens (each word's first; labels -100 are skipped) and the logits
    (batch, seq, num_tags)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    loss = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch["labels"].flatten(),
        reduction="sum",
        ignore_index=lm.IGNORE,
        label_smoothing=label_smoothing,
    )
    return loss, logits


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != lm.IGNORE).sum())


def count_tagged(batch: dict[str, torch.Tensor]) -> int:
    """Token classification: the words a batch scores (their first sub-tokens)."""
    return int((batch["labels"] != lm.IGNORE).sum())
