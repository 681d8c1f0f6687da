"""The records the layers above pass around: what a task's data is once built (`TaskData`: the splits, the
collate function, the labels), how many examples a split has, which of them a cap keeps (data.max_samples,
data.max_eval_samples: the same draw for tables, image folders and dataset splits), and how many loader workers
it gets."""

from __future__ import annotations

import random
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


def capped(total: int, cap: int | None, seed: int) -> list[int]:
    """Which of `total` examples a cap of `cap` keeps: `cap` of them drawn in a seeded order, returned in their own
    order (all of them when there is no cap or the cap is not below `total`)."""
    if cap is None or cap >= total:
        return list(range(total))
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted(order[:cap])


def cap_note(split: str, kept: int, total: int | None, what: str, key: str, cap: int | None) -> str | None:
    """The log line that says what a cap kept, e.g. "train: 16 of 64 images (data.max_samples)"; None without a cap.
    `total` None: the split's size before the cap is not known (drawn blocks of a text)."""
    if cap is None:
        return None
    if total is None:
        return f"{split}: {kept:,} {what} ({key} {cap:,}" + (f": {kept:,} available)" if kept < cap else ")")
    if kept < total:
        return f"{split}: {kept:,} of {total:,} {what} ({key})"
    return f"{split}: all {total:,} {what} ({key} {cap:,}: {total:,} available)"


def capped_splits(
    cfg: Config, train: Any, val: Any, cap: Callable[[Any, int | None, int], Any], size: Callable[[Any], int], what: str
) -> tuple[Any, Any, list[str]]:
    """(train, val, lines): train under data.max_samples and val under data.max_eval_samples, each cut by
    `cap(split, n, seed)` and measured by `size(split)`, and the lines that say what the caps kept."""
    d, seed, out, notes = cfg.data, cfg.training.seed, [], []
    for name, split, key, n in (
        ("train", train, "data.max_samples", d.max_samples),
        ("val", val, "data.max_eval_samples", d.max_eval_samples),
    ):
        kept = None if split is None else cap(split, n, seed)
        if split is not None:
            notes.append(cap_note(name, size(kept), size(split), what, key, n))
        out.append(kept)
    return out[0], out[1], [line for line in notes if line]


def block_task_data(cfg: Config, blocks: Callable[[str, int | None], Any], collate: Callable[..., Any]) -> TaskData:
    """A causal LM's TaskData from `blocks(split, cap)` (a split's packed blocks, or None): train under
    data.max_samples, val under data.max_eval_samples, test whole, and the log lines of what the caps kept; a file
    source and a `datasets` source differ only in `blocks`."""
    train, val = blocks("train", cfg.data.max_samples), blocks("val", cfg.data.max_eval_samples)
    return TaskData(
        train=train,
        val=val,
        test=blocks("test", None),
        collate=collate,
        num_workers=worker_count(cfg, 0),
        info={"caps": block_caps(cfg, train, val)},
    )


def block_caps(cfg: Config, train: Any, val: Any) -> list[str]:
    """The lines that say what data.max_samples / max_eval_samples kept of a text's packed blocks (drawn while
    packing, so how many the text held is said only when the cap took them all)."""
    d, what = cfg.data, f"blocks of {cfg.data.seq_len} tokens"
    notes = [cap_note("train", len(train), None, what, "data.max_samples", d.max_samples)]
    if val is not None:
        notes.append(cap_note("val", len(val), None, what, "data.max_eval_samples", d.max_eval_samples))
    return [line for line in notes if line]
