"""Tasks as small records of functions: how to read the data, build datasets, compute the loss and count the
examples (or tokens) a loss is averaged over. No class hierarchy: the trainer picks a record from TASKS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fulltune.config import METRICS, Config, ConfigError
from fulltune.data import hf_datasets, hf_stream, lm
from fulltune.data import images as img
from fulltune.data import text as txt
from fulltune.data.records import TaskData, block_task_data, capped_splits, worker_count
from fulltune.errors import DataError
from fulltune.eval.losses import classification_loss, count_examples, count_tokens, lm_loss


def infer_task(cfg: Config) -> str:
    task = _infer_task(cfg)
    if cfg.training.metric not in ("auto", *METRICS[task]):
        raise ConfigError(
            f"config key 'training.metric': '{cfg.training.metric}' is not a metric of {task} (the task "
            f"of this data); choose auto, {', '.join(METRICS[task])}"
        )
    return task


def _infer_task(cfg: Config) -> str:
    if cfg.task != "auto":
        return cfg.task
    d = cfg.data
    if d.dataset_name:
        return hf_datasets.infer_task(cfg)
    if d.data_dir and (Path(d.data_dir) / "train").is_dir():
        return "image_classification"
    if d.data_dir and not d.train_file and (Path(d.data_dir) / "train.txt").is_file():
        return "causal_lm"
    files = [f for f in (d.train_file, d.val_file, d.test_file) if f]
    if files and all(Path(f).suffix.lower() == ".txt" for f in files):
        return "causal_lm"
    train = d.train_file or (str(Path(d.data_dir) / "train.jsonl") if d.data_dir else None)
    if train and lm.is_lm_jsonl(Path(train), d):  # prompt/response records, no label
        return "causal_lm"
    return "text_classification"


# ---------------------------------------------------------------- reading labels (before the model exists)


def read_labels(cfg: Config, task: str) -> tuple[list[str] | None, Any]:
    """Label vocabulary from the train split, and whatever was read so it is not read twice."""
    if cfg.data.dataset_name:
        streamed = cfg.data.streaming and task != "causal_lm"
        labels, raw = (hf_stream if streamed else hf_datasets).read_labels(cfg, task)
        if labels is None:  # causal LM
            return None, raw
    elif task == "image_classification":
        if not cfg.data.data_dir:
            raise ConfigError("image_classification needs data.data_dir (or --data_dir) with train/<class>/ folders")
        train = img.scan_split(Path(cfg.data.data_dir) / "train")
        labels = train.classes
        raw: Any = train
    elif task == "text_classification":
        files = txt.split_files(cfg.data)
        if files["train"] is None:
            raise DataError(
                f"no training table: expected train.csv/.tsv/.jsonl in '{cfg.data.data_dir}' or data.train_file"
            )
        examples = txt.read_examples(files["train"], cfg.data)
        labels = txt.label_vocabulary(examples.labels)
        raw = (files, examples)
    else:
        return None, None
    if cfg.data.num_classes is not None and cfg.data.num_classes != len(labels):
        raise DataError(f"data.num_classes={cfg.data.num_classes} but the training data has {len(labels)} classes")
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} class; classification needs at least 2")
    return labels, raw


# ---------------------------------------------------------------- datasets (after the model and tokenizer exist)


def build_image_data(cfg: Config, bundle: Any, labels: list[str], train: img.ImageFolder) -> TaskData:
    if cfg.data.dataset_name:
        build = hf_stream.build_image_data if cfg.data.streaming else hf_datasets.build_image_data
        return build(cfg, bundle, labels, train)
    root = Path(cfg.data.data_dir)
    val = img.scan_split(root / "val", labels) if (root / "val").is_dir() else None
    test = img.scan_split(root / "test", labels) if (root / "test").is_dir() and cfg.data.read_test else None
    info = {"skipped_images": [str(p) for f in (train, val, test) if f is not None for p in f.skipped]}
    if val is None and cfg.data.val_fraction > 0:
        train, val = img.holdout_images(train, cfg.data.val_fraction)
        info["val_source"] = f"{cfg.data.val_fraction:.0%} of train (by file-name hash)"
    train, val, info["caps"] = capped_splits(cfg, train, val, img.cap_images, lambda f: len(f.samples), "images")
    spec = bundle.image_spec
    return TaskData(
        train=img.ImageDataset(train, spec, cfg.data.augmentation),
        val=img.ImageDataset(val, spec, None) if val else None,
        test=img.ImageDataset(test, spec, None) if test else None,
        collate=img.collate_images,
        labels=labels,
        with_seeds=True,
        num_workers=worker_count(cfg, 2),
        info=info,
    )


def _tokenized(examples: txt.TextExamples, vocab: list[str], tokenizer: Any, max_length: int) -> txt.TokenizedDataset:
    ids = txt.tokenize(tokenizer, examples.texts, max_length)
    return txt.TokenizedDataset(ids, txt.label_ids(examples, vocab), examples.texts)


def build_text_data(cfg: Config, bundle: Any, labels: list[str], raw: Any) -> TaskData:
    if cfg.data.streaming:
        return hf_stream.build_text_data(cfg, bundle, labels, raw)
    files, train = raw
    d = cfg.data
    # From data.dataset_name the splits arrive already read (TextExamples); files are read here.
    val = files["val"] if not isinstance(files["val"], Path) else txt.read_examples(files["val"], d)
    test = files["test"] if not isinstance(files["test"], Path) else txt.read_examples(files["test"], d)
    info: dict[str, Any] = {}
    if val is None and d.val_fraction > 0:
        train, val = txt.holdout_split(train, d.val_fraction)
        info["val_source"] = f"{d.val_fraction:.0%} of train (by text hash)"
    train, val, info["caps"] = capped_splits(cfg, train, val, txt.cap, lambda e: len(e.texts), "texts")
    tok = bundle.tokenizer
    train_ds = _tokenized(train, labels, tok, d.max_length)
    return TaskData(
        train=train_ds,
        val=_tokenized(val, labels, tok, d.max_length) if val else None,
        test=_tokenized(test, labels, tok, d.max_length) if test else None,
        collate=txt.PadCollator(tok.pad_token_id),
        labels=labels,
        lengths=train_ds.lengths,
        num_workers=worker_count(cfg, 0),
        info=info,
    )


def build_lm_data(cfg: Config, bundle: Any, labels: None, raw: Any) -> TaskData:
    """Packed blocks of data.seq_len tokens; data.max_samples / max_eval_samples keep that many blocks (seeded)."""
    d = cfg.data
    if d.dataset_name:
        build = hf_stream.build_lm_data if d.streaming else hf_datasets.build_lm_data
        return build(cfg, bundle, raw)
    files: dict[str, str | None] = {}
    for split in ("train", "val", "test"):
        files[split] = getattr(d, f"{split}_file")
        if files[split] is None and d.data_dir:
            found = [Path(d.data_dir) / f"{stem}{ext}" for stem in txt.SPLIT_NAMES[split] for ext in (".txt", ".jsonl")]
            files[split] = next((str(p) for p in found if p.is_file()), None)
    files["test"] = files["test"] if d.read_test else None  # data.read_test false: never read
    if not files["train"]:
        raise DataError("causal_lm needs data.train_file (a .txt or .jsonl file) or a data_dir with train.txt")
    for split, f in files.items():
        if f and not Path(f).is_file():
            raise DataError(f"data.{split}_file '{f}' does not exist")
    cache = Path(cfg.output_dir) / "cache"

    def blocks(split: str, cap: int | None) -> lm.BlockDataset | None:
        f = files[split]
        # val and test keep their ragged tail: their perplexity is the one `fulltune evaluate` gives on the file
        tail = split != "train"
        return lm.load_blocks(Path(f), d, bundle.tokenizer, cache, cap, cfg.training.seed, tail) if f else None

    return block_task_data(cfg, blocks, lm.collate_blocks)


# ---------------------------------------------------------------- losses: (sum of losses, what was counted)


@dataclass(frozen=True)
class Task:
    build_data: Callable
    loss: Callable
    count: Callable
    default_metric: str
    higher_is_better: bool


TASKS: dict[str, Task] = {
    "image_classification": Task(build_image_data, classification_loss, count_examples, "accuracy", True),
    "text_classification": Task(build_text_data, classification_loss, count_examples, "accuracy", True),
    "causal_lm": Task(build_lm_data, lm_loss, count_tokens, "perplexity", False),
}


def validation_metric(cfg: Config, task: Task) -> tuple[str, bool]:
    """The validation metric that picks best/ and drives early stopping, and whether higher is better."""
    name = cfg.training.metric
    if name == "auto":
        return task.default_metric, task.higher_is_better
    return name, name not in ("loss", "perplexity")


def data_loader(
    data: TaskData,
    dataset: Any,
    device: torch.device,
    seed: int,
    batch_sampler: Any = None,
    batch_size: int | None = None,
) -> torch.utils.data.DataLoader:
    """A loader over `dataset` with the task's collate and workers: by `batch_sampler` (training) or in order."""
    kwargs: dict[str, Any] = dict(
        collate_fn=data.collate,
        num_workers=data.num_workers,
        pin_memory=device.type == "cuda",
        # A private generator: worker seeding must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )
    if data.num_workers > 0:
        kwargs["prefetch_factor"] = 4
        kwargs["persistent_workers"] = False
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # A stream: in training it yields whole batches in its own seeded, resumable order; else it is batched here.
        size = None if batch_sampler is not None else batch_size
        return torch.utils.data.DataLoader(dataset, batch_size=size, **kwargs)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
