"""Streaming `data.dataset_name` (`data.streaming: true`) for sets larger than memory: a hub or builder source is
read with `load_dataset(..., streaming=True)`, a `save_to_disk` folder through `to_iterable_dataset`.

The order is `IterableDataset.shuffle(seed=training.seed, buffer_size=data.shuffle_buffer)` with `set_epoch(pass)`,
the same on every run with the same seed. A resume skips, deterministically, the examples the checkpoint's
batches already took (the shuffle buffer itself is never saved), so it is bit-identical to an uninterrupted run.

An epoch is one pass when the number of training examples is known (a saved split's length, or the split's
`num_examples` in the dataset info, with no hold-out carved from train); otherwise the run is one epoch of
training.max_steps steps over passes that follow each other, each pass reshuffled.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, ConfigError
from fulltune.data import hf_datasets as hf
from fulltune.data import images as img
from fulltune.data import lm
from fulltune.data import text as txt
from fulltune.data.records import TaskData
from fulltune.data.sampler import sample_seed
from fulltune.errors import DataError
from fulltune.runtime.ranks import world_size

SHARDS = 64
"""Shards a saved folder is read in: the shuffle permutes them, then mixes examples in the buffer."""


def _one_process() -> None:
    if world_size() > 1:
        raise ConfigError(
            "data.streaming runs on one process (a stream is not split across ranks); run without torchrun or set "
            "data.streaming=false (a save_to_disk folder is memory-mapped, never held in memory)"
        )


def as_stream(ds: Any) -> Any:
    """An `IterableDataset` of `ds`: a saved (memory-mapped) split is read in SHARDS contiguous shards."""
    if isinstance(ds, hf._datasets().Dataset):
        return ds.to_iterable_dataset(num_shards=max(1, min(SHARDS, len(ds))))
    return ds


def known_size(ds: Any) -> int | None:
    """The number of rows of a split when known without reading it: a saved split's length, or the dataset info."""
    if isinstance(ds, hf._datasets().Dataset):
        return len(ds)
    splits = getattr(ds.info, "splits", None) or {}
    info = splits.get(str(ds.split)) if ds.split is not None else None
    return int(info.num_examples) if info is not None and info.num_examples else None


class StreamOrder:
    """What a ResumableBatchSampler is to the trainer for a stream: `set_epoch(epoch, skip_batches)` before each
    epoch, and its length in batches."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __bool__(self) -> bool:
        return True


class StreamTrain(torch.utils.data.IterableDataset):
    """Training batches (lists of examples, collated by the loader) in the seeded stream order, from the epoch and
    the batches already done that `order` holds. `num_examples` set: one pass per epoch; None: the passes follow
    each other and the run's batches are counted from its start. `examples(rows, pass, start)` turns a pass's rows
    (from its row `start` on) into examples (the pass number seeds image augmentation; evaluation passes None).
    With `rows_are_examples` (classification: one example per row) a resume skips rows, never tokenised or
    decoded; causal LM blocks are made and dropped."""

    def __init__(
        self,
        rows: Callable[[int], Iterable[dict[str, Any]]],
        examples: Callable[[Iterable[dict[str, Any]], int | None, int], Iterator[dict[str, Any]]],
        order: StreamOrder,
        batch_size: int,
        num_examples: int | None,
        where: str,
        rows_are_examples: bool = True,
    ) -> None:
        self.rows = rows
        self.examples = examples
        self.order = order
        self.batch_size = batch_size
        self.num_examples = num_examples
        self.where = where
        self.rows_are_examples = rows_are_examples

    def _items(self, first_pass: int, skip: int) -> Iterator[dict[str, Any]]:
        """The examples from pass `first_pass` on (one pass when the length is known), the first `skip` dropped."""
        for n_pass in itertools.count(first_pass):
            rows = iter(self.rows(n_pass))
            skipped = sum(1 for _ in itertools.islice(rows, skip)) if self.rows_are_examples else 0
            skip -= skipped
            count = skipped
            for item in self.examples(rows, n_pass, skipped):
                count += 1
                if skip:
                    skip -= 1
                    continue
                yield item
            if count == 0:
                raise DataError(f"{self.where}: one pass of the stream gives no training example")
            if self.num_examples is not None:
                return

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        o, bs = self.order, self.batch_size
        if self.num_examples is not None:
            items = self._items(o.epoch, o.skip_batches * bs)
        else:  # (the run's one epoch spans passes: skip every batch done since the start)
            items = self._items(0, (o.epoch * len(o) + o.skip_batches) * bs)
        for _ in range(len(o) - o.skip_batches):
            batch = list(itertools.islice(items, bs))
            if not batch:
                raise DataError(
                    f"{self.where}: the stream ended before the {self.num_examples} examples its size promised"
                )
            yield batch


class StreamEval(torch.utils.data.IterableDataset):
    """Evaluation examples in stream order (never shuffled), at most `limit` of them."""

    def __init__(
        self,
        rows: Callable[[], Iterable[dict[str, Any]]],
        examples: Callable[[Iterable[dict[str, Any]], int | None, int], Iterator[dict[str, Any]]],
        num_examples: int | None,
        limit: int | None = None,
    ) -> None:
        self.rows = rows
        self.examples = examples
        self.num_examples = num_examples if limit is None or num_examples is None else min(num_examples, limit)
        self.limit = limit

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.islice(self.examples(self.rows(), None, 0), self.limit)


def _passes(base: Any, cfg: Config) -> Callable[[int], Any]:
    """The rows of pass n: `base` reshuffled with set_epoch(n), or in order with data.shuffle_buffer=0."""
    if cfg.data.shuffle_buffer == 0:
        return lambda n_pass: base
    shuffled = base.shuffle(seed=cfg.training.seed, buffer_size=cfg.data.shuffle_buffer)

    def rows(n_pass: int) -> Any:
        shuffled.set_epoch(n_pass)
        return shuffled

    return rows


def _batches_per_epoch(cfg: Config, num_examples: int | None, why: str) -> int:
    t = cfg.training
    if num_examples == 0:
        raise DataError(f"data.dataset_name '{cfg.data.dataset_name}': the training split is empty")
    if num_examples is not None:
        return math.ceil(num_examples / cfg.data.batch_size)
    if t.progressive_unfreezing.enabled or cfg.method.head_init == "linear_probe":
        raise ConfigError(
            f"data.streaming: the training stream of '{cfg.data.dataset_name}' has no known length ({why}), so the "
            "run is one epoch; training.progressive_unfreezing and method.head_init=linear_probe schedule by epochs"
        )
    if t.max_steps is None:
        raise ConfigError(
            f"data.streaming: the length of the training stream of '{cfg.data.dataset_name}' is not known ({why}); "
            "set training.max_steps"
        )
    return t.max_steps * t.gradient_accumulation_steps


# ---------------------------------------------------------------- text classification


def read_labels(cfg: Config, task: str) -> tuple[list[str], hf.HubSplits]:
    """The label vocabulary of a streamed set: a ClassLabel's names, else one pass over the label column."""
    _one_process()
    hub = hf.open_splits(cfg)
    d = cfg.data
    column = (d.text_column, "data.text_column")
    if task == "image_classification":
        column = (d.image_column, "data.image_column")
    wanted = [column, (d.label_column, "data.label_column")]
    for which in ("train", "val", "test"):
        if getattr(hub, which) is not None:
            hf._check_columns(getattr(hub, which), wanted, hub.name, str(hub.split_names[which]))
    if hub.class_names is not None:
        return list(hub.class_names), hub
    names: set[str] = set()
    for r, value in enumerate(hf.column_values(hub.train, d.label_column), start=1):
        name = _label_name(value, hub)
        if name is None:
            split = hub.split_names["train"]
            raise DataError(f"data.dataset_name '{hub.name}' split '{split}' row {r}: empty '{d.label_column}'")
        names.add(name)
    return txt.label_vocabulary(list(names)), hub


def _label_name(value: Any, hub: hf.HubSplits) -> str | None:
    """A label value as the map-style reader names it; None when empty."""
    if value is None or (hub.class_names is not None and value < 0) or str(value).strip() == "":
        return None
    return hub.class_names[value] if hub.class_names is not None else str(value).strip()


def _text_examples(cfg: Config, hub: hf.HubSplits, labels: list[str], tokenizer: Any, where: str) -> Callable:
    """Rows -> tokenised examples exactly as the local reader makes them (text stripped, label id)."""
    d = cfg.data
    index = {name: i for i, name in enumerate(labels)}

    def examples(rows: Iterable[dict[str, Any]], n_pass: int | None, start: int) -> Iterator[dict[str, Any]]:
        for r, row in enumerate(rows, start=start + 1):
            text = row[d.text_column]
            if text is None or not str(text).strip():
                raise DataError(f"{where} example {r} (stream order): empty text in column '{d.text_column}'")
            name = _label_name(row[d.label_column], hub)
            if name is None:
                raise DataError(f"{where} example {r} (stream order): empty label in column '{d.label_column}'")
            if name not in index:
                raise DataError(
                    f"{where} example {r} (stream order): label '{name}' is not among the train labels "
                    f"({', '.join(labels)})"
                )
            ids = tokenizer(str(text).strip(), truncation=True, max_length=d.max_length)["input_ids"]
            yield {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": index[name]}

    return examples


def _in_holdout(cfg: Config) -> Callable[[dict[str, Any]], bool]:
    """The local readers' hold-out rule (a hash of the stripped text below data.val_fraction), on a row."""
    d = cfg.data
    return lambda row: txt.hash_fraction(str(row[d.text_column] or "").strip()) < d.val_fraction


def stream_caps(cfg: Config, what: str) -> list[str]:
    """The lines that say what data.max_samples / max_eval_samples keep of a stream: its first N examples."""
    d = cfg.data
    caps = (("train", "data.max_samples", d.max_samples), ("val", "data.max_eval_samples", d.max_eval_samples))
    return [f"{split}: the first {n:,} {what} of the stream ({key})" for split, key, n in caps if n is not None]


def build_text_data(cfg: Config, bundle: Any, labels: list[str], hub: hf.HubSplits) -> Any:
    d = cfg.data
    where = {w: f"data.dataset_name '{hub.name}' split '{hub.split_names[w]}'" for w in ("train", "val", "test")}
    holdout = hub.val is None and d.val_fraction > 0
    in_val = _in_holdout(cfg)
    train_rows = as_stream(hub.train)
    if holdout:
        train_rows = train_rows.filter(lambda row: not in_val(row))
    if d.max_samples is not None:
        train_rows = train_rows.take(d.max_samples)  # the first N of the stream, before shuffling
    n = None if holdout else known_size(hub.train)
    if n is not None and d.max_samples is not None:
        n = min(n, d.max_samples)
    why = f"data.val_fraction={d.val_fraction} holds out part of it" if holdout else "its dataset info gives no size"
    order = StreamOrder(_batches_per_epoch(cfg, n, why))
    tok = bundle.tokenizer
    train = StreamTrain(
        _passes(train_rows, cfg),
        _text_examples(cfg, hub, labels, tok, where["train"]),
        order,
        d.batch_size,
        n,
        where["train"],
    )
    info: dict[str, Any] = {"streaming": True, "caps": stream_caps(cfg, "texts")}
    val = None
    if hub.val is not None:
        val_rows = as_stream(hub.val)
        val = StreamEval(
            lambda: val_rows,
            _text_examples(cfg, hub, labels, tok, where["val"]),
            known_size(hub.val),
            d.max_eval_samples,
        )
    elif holdout:
        held = as_stream(hub.train).filter(in_val)
        val = StreamEval(lambda: held, _text_examples(cfg, hub, labels, tok, where["train"]), None, d.max_eval_samples)
        info["val_source"] = f"{d.val_fraction:.0%} of train (by text hash)"
    test = None
    if hub.test is not None:
        test_rows = as_stream(hub.test)
        test = StreamEval(lambda: test_rows, _text_examples(cfg, hub, labels, tok, where["test"]), known_size(hub.test))
    return TaskData(
        train=train,
        val=val,
        test=test,
        collate=txt.PadCollator(tok.pad_token_id),
        labels=labels,
        info=info,
        sampler=order,
    )


# ---------------------------------------------------------------- causal LM


def build_lm_data(cfg: Config, bundle: Any, hub: hf.HubSplits) -> Any:
    """Packed blocks of data.seq_len tokens from the rows as they stream (the rows of each pass reshuffled): the
    blocks of the map-style reader, in stream order."""

    _one_process()
    d = cfg.data
    if d.max_samples is not None:
        raise ConfigError(
            "data.max_samples: a streamed causal LM set cannot draw blocks at random; cap the run with "
            "training.max_steps and unset data.max_samples"
        )
    order = StreamOrder(_batches_per_epoch(cfg, None, "packed blocks are counted only as the text is read"))

    def blocks(which: str) -> Callable:
        where = f"data.dataset_name '{hub.name}' split '{hub.split_names[which]}'"
        return lambda rows, n_pass, start: lm.stream_blocks(
            hf.lm_records(rows, cfg, where), bundle.tokenizer, d.seq_len, keep_tail=which != "train"
        )

    def stream(which: str, limit: int | None) -> StreamEval | None:
        ds = getattr(hub, which)
        if ds is None:
            return None
        rows = as_stream(hf.lm_rows(ds, cfg))
        return StreamEval(lambda: rows, blocks(which), None, limit)

    train_rows = as_stream(hf.lm_rows(hub.train, cfg))
    where = f"data.dataset_name '{hub.name}' split '{hub.split_names['train']}'"
    train = StreamTrain(_passes(train_rows, cfg), blocks("train"), order, d.batch_size, None, where, False)
    return TaskData(
        train=train,
        val=stream("val", d.max_eval_samples),
        test=stream("test", None),
        collate=lm.collate_blocks,
        info={"streaming": True},
        sampler=order,
    )


# ---------------------------------------------------------------- images


def _image_rows(ds: Any, column: str) -> Any:
    """A stream of the split with its images undecoded ({'bytes', 'path'}): each is opened as a file is."""
    return as_stream(ds).cast_column(column, hf._datasets().Image(decode=False))


def _image_name(row: dict[str, Any], index: int, column: str) -> str:
    """What the image-folder hold-out hashes: the file name, or the row's position when the image has none."""
    path = row[column].get("path")
    return Path(path).name if path else f"row-{index}"


def _image_examples(cfg: Config, hub: hf.HubSplits, labels: list[str], spec: Any, where: str) -> Callable:
    """Rows -> pixel values and label ids as HubImageDataset makes them; a training pass augments example i of
    pass p with the seed the map-style sampler gives index i in epoch p."""
    d = cfg.data
    index = {name: i for i, name in enumerate(labels)}

    def examples(rows: Iterable[dict[str, Any]], n_pass: int | None, start: int) -> Iterator[dict[str, Any]]:
        for r, row in enumerate(rows, start=start):
            name = _label_name(row[d.label_column], hub)
            if name not in index:
                raise DataError(f"{where} example {r + 1} (stream order): label {name!r} is not a train label")
            cell = row[d.image_column]
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
            try:
                im = img.load_rgb(source, spec.size, draft=n_pass is not None)
            except DataError:
                raise DataError(f"{where} example {r + 1} (stream order): the image cannot be decoded") from None
            if n_pass is None:
                pixels = img.eval_transform(im, spec)
            else:
                rng = random.Random(sample_seed(cfg.training.seed, n_pass, r))
                pixels = img.train_transform(im, spec, d.augmentation, rng)
            yield {"pixel_values": pixels, "labels": index[name]}

    return examples


def build_image_data(cfg: Config, bundle: Any, labels: list[str], hub: hf.HubSplits) -> Any:
    """tasks.build_image_data for a stream; the image folders' hold-out rule (a hash of the file name)."""

    d = cfg.data
    where = {w: f"data.dataset_name '{hub.name}' split '{hub.split_names[w]}'" for w in ("train", "val", "test")}
    spec, col = bundle.image_spec, d.image_column
    holdout = hub.val is None and d.val_fraction > 0
    in_val = lambda row, i: txt.hash_fraction(_image_name(row, i, col)) < d.val_fraction  # noqa: E731
    train_rows = _image_rows(hub.train, col)
    if holdout:
        train_rows = train_rows.filter(lambda row, i: not in_val(row, i), with_indices=True)
    if d.max_samples is not None:
        train_rows = train_rows.take(d.max_samples)
    n = None if holdout else known_size(hub.train)
    if n is not None and d.max_samples is not None:
        n = min(n, d.max_samples)
    why = f"data.val_fraction={d.val_fraction} holds out part of it" if holdout else "its dataset info gives no size"
    order = StreamOrder(_batches_per_epoch(cfg, n, why))
    examples = _image_examples(cfg, hub, labels, spec, where["train"])
    train = StreamTrain(_passes(train_rows, cfg), examples, order, d.batch_size, n, where["train"])
    info: dict[str, Any] = {"streaming": True, "skipped_images": [], "caps": stream_caps(cfg, "images")}
    val = None
    if hub.val is not None:
        val_rows, val_n = _image_rows(hub.val, col), known_size(hub.val)
        val = StreamEval(
            lambda: val_rows, _image_examples(cfg, hub, labels, spec, where["val"]), val_n, d.max_eval_samples
        )
    elif holdout:
        held = _image_rows(hub.train, col).filter(in_val, with_indices=True)
        examples = _image_examples(cfg, hub, labels, spec, where["train"])
        val = StreamEval(lambda: held, examples, None, d.max_eval_samples)
        info["val_source"] = f"{d.val_fraction:.0%} of train (by file-name hash)"
    test = None
    if hub.test is not None:
        test_rows = _image_rows(hub.test, col)
        test = StreamEval(
            lambda: test_rows, _image_examples(cfg, hub, labels, spec, where["test"]), known_size(hub.test)
        )
    return TaskData(
        train=train, val=val, test=test, collate=img.collate_images, labels=labels, info=info, sampler=order
    )
