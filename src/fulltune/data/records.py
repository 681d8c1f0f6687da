"""The records the layers above pass around: what a task's data is once built (`TaskData`: the splits, the
collate function, the labels), how many examples a split has, and how many loader workers it gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fulltune.config import Config


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    test: torch.utils.data.Dataset | None
    collate: Callable
    labels: list[str] | None = None
    lengths: list[int] | None = None
    with_seeds: bool = False
    num_workers: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    sampler: Any = None
    """A stream's own epoch order (data.streaming: set_epoch(epoch, skip_batches), len = batches per epoch), which
    the trainer uses in place of a ResumableBatchSampler."""


def split_size(dataset: Any) -> int | None:
    """Examples in a split; None for a stream whose length is not known."""
    return len(dataset) if hasattr(dataset, "__len__") else getattr(dataset, "num_examples", None)


def worker_count(cfg: Config, default: int) -> int:
    return default if cfg.data.num_workers < 0 else cfg.data.num_workers
