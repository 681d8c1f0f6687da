"""The losses training and evaluation share (classification cross-entropy, regression MSE or Huber, the causal-LM
token loss) and what a batch counts as (examples or tokens)."""

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


def mse_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed squared error of a regression's one output (logits (batch, 1)) against its float labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.mse_loss(logits.float().squeeze(-1), batch["labels"].float(), reduction="sum"), logits


def huber_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed Huber loss (delta 1: squared below an error of 1, linear above) of a regression's one output."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.huber_loss(logits.float().squeeze(-1), batch["labels"].float(), reduction="sum", delta=1.0), logits


REGRESSION_LOSSES = {"mse": mse_loss, "huber": huber_loss}
"""training.loss -> a regression's loss function."""


def lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens (labels -100 are skipped)."""
    # use_cache=False: no key/value cache is built in training (a pruned folder's config may still ask for one).
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (batch, seq, vocab)
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    loss = F.cross_entropy(
        shift_logits, shift_labels, reduction="sum", ignore_index=lm.IGNORE, label_smoothing=label_smoothing
    )
    return loss, logits


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != lm.IGNORE).sum())
