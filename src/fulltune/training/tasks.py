"""Tasks as small records of functions: how to read the data, build datasets, compute the loss and count the
examples (or tokens) a loss is averaged over. No class hierarchy: the trainer picks a record from TASKS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fulltune.config import METRICS, Config, ConfigError, DataConfig
from fulltune.data import chat, hf_datasets, hf_stream, lm, multilabel
from fulltune.data import images as img
from fulltune.data import text as txt
from fulltune.data import tokens as tok
from fulltune.data.records import TaskData, block_task_data, capped_splits, worker_count
from fulltune.errors import DataError
from fulltune.eval.losses import (
    REGRESSION_LOSSES,
    classification_loss,
    count_examples,
    count_tagged,
    count_tokens,
    lm_loss,
    multi_label_loss,
    token_loss,
)


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
    if multilabel.is_multi_label(cfg):  # label lists, or data.label_separator set
        return "multi_label_classification"
    if d.dataset_name:
        return hf_datasets.infer_task(cfg)
    if d.data_dir and (Path(d.data_dir) / "train").is_dir():
        return "image_classification"
    if tok.is_token_data(d):  # a .conll file, or JSONL of token and tag lists
        return "token_classification"
    if d.data_dir and not d.train_file and (Path(d.data_dir) / "train.txt").is_file():
        return "causal_lm"
    files = [f for f in (d.train_file, d.val_file, d.test_file) if f]
    if files and all(Path(f).suffix.lower() == ".txt" for f in files):
        return "causal_lm"
    train = txt.split_files(d)["train"]
    if train is None:  # (read_labels says what is missing)
        return "text_classification"
    return table_task(train, d)


LAYOUTS: list[tuple[str, Callable[[Path, DataConfig], bool]]] = [
    ("causal_lm", lm.is_lm_jsonl),  # prompt/response records, no label
    ("causal_lm", chat.is_chat_jsonl),  # conversations: chat-format SFT of a causal LM
]
"""Table layouts that name their task, tried in order before the single-text and pair layouts: (task,
fits(train file, data config)). A task with its own layout adds its detector here."""

NEEDS = {
    "text_classification": "a text column (data.text_column, default 'text') and a label column "
    "(data.label_column, default 'label')",
    "text_regression": "the same with numbers as labels",
    "sentence pairs": "two text columns (data.text_column and data.text_pair_column, or "
    + ", ".join(f"{a}/{b}" for a, b in txt.PAIR_COLUMNS)
    + ") and a label column",
    "multi_label_classification": "a text column and a label column of lists (JSONL) or cells split at "
    "data.label_separator",
    "token_classification": "a .conll file, or JSONL of word lists and tag lists (data.tokens_column, "
    "data.tags_column)",
    "causal_lm": "prompt/response (or text) fields without a label, a messages list (chat), or a .txt file",
}
"""What each task needs of a table, for the one line that says a file fits none."""


def table_task(path: Path, d: DataConfig) -> str:
    """The task of a train table: a layout of LAYOUTS, else one or two text columns and a label column (a
    regression when the labels are numbers, not all whole: `text.is_regression`). A table with neither the text nor
    the label column fits none: one DataError naming its columns and what each task needs."""
    for task, fits in LAYOUTS:
        if fits(path, d):
            return task
    columns = txt.read_table(path, d.format, d.encoding)[1]
    if txt.text_columns(d, columns)[0] in columns or d.label_column in columns:
        examples = txt.read_examples(path, d)  # (a text or label column it lacks is an error naming that column)
        return "text_regression" if txt.is_regression(examples.labels) else "text_classification"
    needs = "; ".join(f"{task}: {need}" for task, need in NEEDS.items())
    raise DataError(
        f"'{path}' fits no task (task: auto): its columns are {', '.join(columns)}; {needs}; or set task and the "
        "column keys"
    )


# ---------------------------------------------------------------- reading labels (before the model exists)


def read_labels(cfg: Config, task: str) -> tuple[list[str] | None, Any]:
    """Label vocabulary from the train split, and whatever was read so it is not read twice."""
    if task == "multi_label_classification":
        return multilabel.read_labels(cfg)
    if task == "token_classification" and cfg.data.dataset_name:  # lists of words and tags per row
        hub = hf_datasets.open_splits(cfg, labelled=False)
        read = {which: tok.hub_sentences(hub, which, cfg.data) for which in ("train", "val", "test")}
        return tok.tag_names(hub, cfg.data) or tok.tag_vocabulary(read["train"].tags), (read, read["train"])
    if cfg.data.dataset_name:
        streamed = cfg.data.streaming and task != "causal_lm"
        if streamed and (task == "text_regression" or cfg.data.text_pair_column):
            raise ConfigError(
                "data.streaming reads single texts with class labels; sentence pairs and text_regression read the "
                "dataset whole: set data.streaming=false"
            )
        labels, raw = (hf_stream if streamed else hf_datasets).read_labels(cfg, task)
        if labels is None:  # causal LM
            return None, raw
    elif task == "image_classification":
        if not cfg.data.data_dir:
            raise ConfigError("image_classification needs data.data_dir (or --data_dir) with train/<class>/ folders")
        train = img.scan_split(Path(cfg.data.data_dir) / "train")
        labels = train.classes
        raw: Any = train
    elif task in ("text_classification", "text_regression"):
        files = txt.split_files(cfg.data)
        if files["train"] is None:
            raise DataError(
                f"no training table: expected train.csv/.tsv/.jsonl in '{cfg.data.data_dir}' or data.train_file"
            )
        examples = txt.read_examples(files["train"], cfg.data)
        labels = txt.label_vocabulary(examples.labels)
        raw = (files, examples)
    elif task == "token_classification":
        files = tok.split_files(cfg.data)
        sentences = tok.read_sentences(files["train"], cfg.data)
        labels, raw = tok.tag_vocabulary(sentences.tags), (files, sentences)
    else:
        return None, None
    settle_text_columns(cfg, raw[1] if isinstance(raw, tuple) and isinstance(raw[1], txt.TextExamples) else None)
    if task == "text_regression":
        txt.regression_targets(raw[1])  # every label a number, said before the model loads
        return txt.output_names(raw[1].labels, cfg.data.label_column, True), raw
    if cfg.data.num_classes is not None and cfg.data.num_classes != len(labels):
        raise DataError(f"data.num_classes={cfg.data.num_classes} but the training data has {len(labels)} classes")
    if len(labels) < 2:
        raise DataError(f"the training data has {len(labels)} class; classification needs at least 2")
    return labels, raw


def settle_text_columns(cfg: Config, train: txt.TextExamples | None) -> None:
    """Write the text columns the train split was read from (`text.text_columns`: a sentence pair's two columns
    found by name) into data.text_column / data.text_pair_column, so the run's config.yaml says them and evaluate
    and predict read the same columns, the pair included."""
    if train is not None and train.columns is not None:
        cfg.data.text_column, cfg.data.text_pair_column = train.columns


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
    tok, regression = bundle.tokenizer, bundle.task == "text_regression"

    def encoded(examples: txt.TextExamples | None) -> txt.TokenizedDataset | None:
        return txt.encoded_dataset(examples, labels, tok, d.max_length, regression) if examples else None

    train_ds = encoded(train)
    return TaskData(
        train=train_ds,
        val=encoded(val),
        test=encoded(test),
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
    if chat.is_chat_jsonl(Path(files["train"]), d):  # conversations, not text to pack into blocks
        return chat.chat_task_data(cfg, bundle.tokenizer, files)
    cache = Path(cfg.output_dir) / "cache"

    def blocks(split: str, cap: int | None) -> lm.BlockDataset | None:
        f = files[split]
        # val and test keep their ragged tail: their perplexity is the one `fulltune evaluate` gives on the file
        tail = split != "train"
        return lm.load_blocks(Path(f), d, bundle.tokenizer, cache, cap, cfg.training.seed, tail) if f else None

    return block_task_data(cfg, blocks, lm.collate_blocks)


def build_token_data(cfg: Config, bundle: Any, labels: list[str], raw: Any) -> TaskData:
    """Tagged sentences of CoNLL/JSONL files, each word's tag on its first sub-token; the log says how many
    sentences data.max_length cut."""
    files, train = raw
    d = cfg.data
    # From data.dataset_name the splits arrive already read (TaggedSentences); files are read here.
    val, test = (tok.read_sentences(f, d) if isinstance(f, Path) else f for f in (files["val"], files["test"]))
    info: dict[str, Any] = {}
    if val is None and d.val_fraction > 0:
        train, val = tok.holdout_split(train, d.val_fraction)
        info["val_source"] = f"{d.val_fraction:.0%} of train (by sentence hash)"
    train, val, info["caps"] = capped_splits(cfg, train, val, tok.cap, lambda s: len(s.words), "sentences")
    splits = {
        name: tok.build_dataset(s, labels, bundle.tokenizer, d.max_length) if s else None
        for name, s in (("train", train), ("val", val), ("test", test))
    }
    info["caps"] += [n for k, v in splits.items() if (n := tok.cut_note(k, v, d.max_length))]
    return TaskData(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        collate=tok.TokenCollator(bundle.tokenizer.pad_token_id),
        labels=labels,
        lengths=splits["train"].lengths,
        num_workers=worker_count(cfg, 0),
        info=info,
    )


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
    "multi_label_classification": Task(multilabel.build_data, multi_label_loss, count_examples, "micro_f1", True),
    "token_classification": Task(build_token_data, token_loss, count_tagged, "f1", True),
    "text_regression": Task(build_text_data, REGRESSION_LOSSES["mse"], count_examples, "mse", False),
    "causal_lm": Task(build_lm_data, lm_loss, count_tokens, "perplexity", False),
}

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae")
"""Validation metrics whose lower values are better (every other one: higher)."""


def task_record(cfg: Config, name: str) -> Task:
    """The record of task `name` as configured (a regression's loss: training.loss)."""
    if name == "text_regression":
        return dataclasses.replace(TASKS[name], loss=REGRESSION_LOSSES[cfg.training.loss])
    return TASKS[name]


def validation_metric(cfg: Config, task: Task) -> tuple[str, bool]:
    """The validation metric that picks best/ and drives early stopping, and whether higher is better."""
    name = cfg.training.metric
    if name == "auto":
        return task.default_metric, task.higher_is_better
    return name, name not in LOWER_IS_BETTER


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
