"""Hugging Face `datasets` as a data source (`data.dataset_name`): a hub id, a `save_to_disk` folder, or a builder
name (csv, json, parquet, imagefolder, ...) with `data.data_files`.

It yields the same structures the local readers yield (TextExamples for text; an indexable image dataset fetched
by (index, seed)), so tokenisation, hold-out, caps, the seeded resumable batch order and the loop are shared: the
same rows in the same order train exactly as the equivalent CSV/TSV/JSONL or image folders do.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, ConfigError
from fulltune.data import images as img
from fulltune.data import lm
from fulltune.data import text as txt
from fulltune.data.records import TaskData, block_task_data, capped, capped_splits, worker_count
from fulltune.data.text import DataError

VAL_SPLITS = ("validation", "val", "valid", "dev")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.dataset_name needs the datasets package: pip install 'fulltune[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _is_saved_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_all_splits(cfg: Config, streaming: bool | None = None) -> dict[str, Any]:
    """Every split of data.dataset_name: (memory-mapped) map-style `datasets.Dataset`s; with `streaming` (default:
    data.streaming) a hub or builder source gives `IterableDataset`s (a saved folder stays memory-mapped)."""
    ds_lib = _datasets()
    d = cfg.data
    name = str(d.dataset_name)
    stream = d.streaming if streaming is None else streaming
    script = Path(name) if name.endswith(".py") else Path(name) / f"{Path(name).name}.py"
    if script.is_file():  # what `load_dataset` would take for a loading script
        raise DataError(
            f"data.dataset_name '{name}': {script.name} is a dataset loading script, code that fulltune "
            "never runs; point data.dataset_name at a folder of data files (csv, json, parquet) or one saved with "
            "save_to_disk"
        )
    try:
        if _is_saved_folder(Path(name)):
            loaded = ds_lib.load_from_disk(name)
        else:
            loaded = ds_lib.load_dataset(name, d.dataset_config, data_files=d.data_files, streaming=stream)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.dataset_name '{name}': cannot load it ({first})") from None
    if isinstance(loaded, (ds_lib.Dataset, ds_lib.IterableDataset)):  # a single saved split
        return {d.train_split: loaded}
    return dict(loaded)


def column_names(ds: Any) -> list[str]:
    """A split's column names; a stream without declared features is asked for its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds.take(1)), {}))


def column_values(ds: Any, name: str) -> Any:
    """The values of one column, in row order: read at once from a table, one row at a time from a stream."""
    if isinstance(ds, _datasets().Dataset):
        return ds[name]
    return (row[name] for row in ds.select_columns([name]))


def features(ds: Any) -> dict[str, Any]:
    return dict(ds.features or {})


def _pick(splits: dict[str, Any], wanted: str | None, defaults: tuple[str, ...], key: str, name: str) -> str | None:
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"data.dataset_name '{name}' has no split '{wanted}' ({key}); it has: {', '.join(splits)}")
        return wanted
    return next((s for s in defaults if s in splits), None)


@dataclass
class HubSplits:
    """The chosen splits of a `datasets` source and what the label column holds."""

    name: str
    train: Any
    val: Any | None
    test: Any | None
    split_names: dict[str, str | None] = field(default_factory=dict)
    class_names: list[str] | None = None
    """Names of a ClassLabel label column (ids index them), else None (labels are the values as text)."""


def _check_columns(ds: Any, columns: list[tuple[str, str]], name: str, split: str) -> None:
    have = column_names(ds)
    for col, key in columns:
        if col not in have:
            raise DataError(
                f"data.dataset_name '{name}' split '{split}': no column '{col}' ({key}); it has: {', '.join(have)}"
            )


def _has_labels(ds: Any, label_column: str) -> bool:
    """Unlabelled test splits (GLUE's hold -1 or None) are not used for test metrics."""
    if label_column not in column_names(ds):
        return False
    return all(v is not None and v != -1 for v in column_values(ds, label_column))


def open_splits(cfg: Config, labelled: bool = True, streaming: bool | None = None) -> HubSplits:
    """The train, validation and test splits; `labelled` (classification) keeps a default test split only when it
    carries labels and reads the label names of a ClassLabel column."""
    d = cfg.data
    name = str(d.dataset_name)
    splits = load_all_splits(cfg, streaming)
    train = _pick(splits, d.train_split, (), "data.train_split", name)
    val = _pick(splits, d.val_split, VAL_SPLITS, "data.val_split", name)
    test = _pick(splits, d.test_split, ("test",), "data.test_split", name) if d.read_test else None
    if labelled and test is not None and d.test_split is None and not _has_labels(splits[test], d.label_column):
        test = None  # the default test split is used only when it carries labels
    feature = features(splits[train]).get(d.label_column) if labelled else None
    names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    return HubSplits(
        name,
        splits[train],
        splits[val] if val else None,
        splits[test] if test else None,
        {"train": train, "val": val, "test": test},
        names,
    )


def infer_task(cfg: Config) -> str:
    """image_classification when the train split's data.image_column is an `Image` feature; causal_lm when it has
    a text (or response) column and no label column; else text_classification."""
    d = cfg.data
    splits = load_all_splits(cfg)
    train = splits.get(d.train_split)
    if train is None:
        raise DataError(
            f"data.dataset_name '{d.dataset_name}' has no split '{d.train_split}' (data.train_split); "
            f"it has: {', '.join(splits)}"
        )
    if type(features(train).get(d.image_column)).__name__ == "Image":
        return "image_classification"
    have = column_names(train)
    if d.label_column not in have and (d.text_column in have or d.response_column in have):
        return "causal_lm"
    return "text_classification"


def _label_names(ds: Any, hub: HubSplits, split: str, column: str) -> list[str]:
    out = []
    for r, value in enumerate(column_values(ds, column), start=1):
        if value is None or (hub.class_names is not None and value < 0) or str(value).strip() == "":
            raise DataError(f"data.dataset_name '{hub.name}' split '{split}' row {r}: empty label in column '{column}'")
        out.append(hub.class_names[value] if hub.class_names is not None else str(value).strip())
    return out


def text_examples(hub: HubSplits, which: str, cfg: Config) -> txt.TextExamples | None:
    """One split as TextExamples (texts stripped, labels as names), exactly what read_examples gives a table."""
    ds = getattr(hub, which)
    if ds is None:
        return None
    split = hub.split_names[which]
    d = cfg.data
    _check_columns(ds, [(d.text_column, "data.text_column"), (d.label_column, "data.label_column")], hub.name, split)
    texts = []
    for r, text in enumerate(column_values(ds, d.text_column), start=1):
        if text is None or (isinstance(text, str) and not text.strip()):
            raise DataError(
                f"data.dataset_name '{hub.name}' split '{split}' row {r}: empty text in column '{d.text_column}'"
            )
        texts.append(str(text).strip())
    labels = _label_names(ds, hub, split, d.label_column)
    return txt.TextExamples(texts, labels, f"{hub.name}[{split}]")


def label_vocabulary(hub: HubSplits, train_labels: list[str]) -> list[str]:
    """ClassLabel names in their id order (so ids match the dataset's), else the local readers' sorted vocabulary."""
    if hub.class_names is not None:
        return list(hub.class_names)
    return txt.label_vocabulary(train_labels)


def read_labels(cfg: Config, task: str) -> tuple[list[str] | None, Any]:
    """What tasks.read_labels returns for files: the label vocabulary (None for causal LM) and what was read."""
    if task == "causal_lm":
        return None, open_splits(cfg, labelled=False)
    hub = open_splits(cfg)  # (a stream's labels: hf_stream.read_labels)
    if task == "text_classification":
        train = text_examples(hub, "train", cfg)
        assert train is not None
        files = {"train": None, "val": text_examples(hub, "val", cfg), "test": text_examples(hub, "test", cfg)}
        return label_vocabulary(hub, train.labels), (files, train)
    d = cfg.data
    for which in ("train", "val", "test"):
        ds = getattr(hub, which)
        if ds is not None:
            _check_columns(
                ds,
                [(d.image_column, "data.image_column"), (d.label_column, "data.label_column")],
                hub.name,
                str(hub.split_names[which]),
            )
    labels = label_vocabulary(hub, _label_names(hub.train, hub, str(hub.split_names["train"]), d.label_column))
    return labels, hub


# ---------------------------------------------------------------- images


class HubImageDataset(torch.utils.data.Dataset):
    """Rows of a `datasets` split with an Image column, decoded and transformed like img.ImageDataset: items by
    (index, seed) in training (the seed drives augmentation), by index in evaluation."""

    def __init__(
        self, ds: Any, rows: list[int], label_ids: list[int], spec: Any, aug: Any, where: str, image_column: str
    ) -> None:
        datasets = _datasets()
        # Undecoded: {'bytes', 'path'} per row, so the image is opened exactly as a file is (draft JPEG in training).
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.rows = rows
        self.label_ids = label_ids
        self.spec = spec
        self.aug = aug
        self.where = where
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int, draft: bool = False) -> Any:
        row = self.rows[index]
        cell = self.ds[row][self.image_column]
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
        if source is None:
            raise DataError(f"{self.where} row {row + 1}: no image bytes or path")
        try:
            return img.load_rgb(source, self.spec.size, draft=draft)  # as ImageDataset decodes files
        except DataError:
            raise DataError(f"{self.where} row {row + 1}: the image cannot be decoded") from None

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        train = self.aug is not None and seed is not None
        try:
            im = self.image(index, draft=train)
        except DataError as err:
            if train:
                raise
            return img.skipped_item(self.spec, err)  # evaluation skips and counts it, never substitutes
        if train:
            pixels = img.train_transform(im, self.spec, self.aug, random.Random(seed))
        else:
            pixels = img.eval_transform(im, self.spec)
        return {"pixel_values": pixels, "labels": self.label_ids[index]}


def _image_ids(hub: HubSplits, ds: Any, which: str, labels: list[str], column: str) -> list[int]:
    split = str(hub.split_names.get(which, which))
    names = _label_names(ds, hub, split, column)
    index = {name: i for i, name in enumerate(labels)}
    for r, name in enumerate(names, start=1):
        if name not in index:
            raise DataError(
                f"data.dataset_name '{hub.name}' split '{split}' row {r}: label '{name}' is not among "
                f"the train labels ({', '.join(labels)})"
            )
    return [index[n] for n in names]


def _file_names(ds: Any, column: str) -> list[str]:
    """Each image's file name (what the image-folder hold-out hashes), or its row number when it has none."""
    datasets = _datasets()
    cells = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    return [Path(c["path"]).name if c.get("path") else f"row-{i}" for i, c in enumerate(cells[column])]


def _capped_rows(rows: list[Any], n: int | None, seed: int) -> list[Any]:
    return [rows[i] for i in capped(len(rows), n, seed)]


def build_image_data(cfg: Config, bundle: Any, labels: list[str], hub: HubSplits) -> Any:
    """tasks.build_image_data for a `datasets` source; the same hold-out rule as image folders (file-name hash)."""

    d = cfg.data
    spec = bundle.image_spec
    ids = {
        w: _image_ids(hub, getattr(hub, w), w, labels, d.label_column) if getattr(hub, w) is not None else None
        for w in ("train", "val", "test")
    }
    train_rows = list(range(len(hub.train)))
    val_source: tuple[Any, list[int], list[int]] | None = None
    info: dict[str, Any] = {"skipped_images": []}
    if hub.val is not None:
        val_source = (hub.val, list(range(len(hub.val))), ids["val"])
    elif d.val_fraction > 0:
        names = _file_names(hub.train, d.image_column)
        keep = [txt.hash_fraction(n) >= d.val_fraction for n in names]
        val_rows = [r for r in train_rows if not keep[r]]
        train_rows = [r for r in train_rows if keep[r]]
        val_source = (hub.train, val_rows, [ids["train"][r] for r in val_rows])
        info["val_source"] = f"{d.val_fraction:.0%} of train (by file-name hash)"
    # data.max_samples / max_eval_samples: the draw an image folder gets, over (row, label id) pairs.
    val_pairs = list(zip(val_source[1], val_source[2], strict=True)) if val_source is not None else None
    train_rows, val_pairs, info["caps"] = capped_splits(cfg, train_rows, val_pairs, _capped_rows, len, "images")
    if val_source is not None:
        val_source = (val_source[0], [r for r, _ in val_pairs], [i for _, i in val_pairs])

    def where(which: str) -> str:
        return f"data.dataset_name '{hub.name}' split '{hub.split_names.get(which)}'"

    col = d.image_column
    train = HubImageDataset(
        hub.train, train_rows, [ids["train"][r] for r in train_rows], spec, d.augmentation, where("train"), col
    )
    val = None
    if val_source is not None and val_source[1]:
        val = HubImageDataset(
            val_source[0],
            val_source[1],
            val_source[2],
            spec,
            None,
            where("val" if hub.val is not None else "train"),
            col,
        )
    test = None
    if hub.test is not None:
        test = HubImageDataset(hub.test, list(range(len(hub.test))), ids["test"], spec, None, where("test"), col)
    return TaskData(
        train=train,
        val=val,
        test=test,
        collate=img.collate_images,
        labels=labels,
        with_seeds=True,
        num_workers=worker_count(cfg, 2),
        info=info,
    )


# ---------------------------------------------------------------- causal LM


def lm_records(rows: Any, cfg: Config, where: str) -> Any:
    """Each row is one record, as a JSONL line is for the local reader: (prompt, response) when the response column
    holds a value (the loss on the response only), else (text, None)."""
    d = cfg.data
    for r, row in enumerate(rows, start=1):
        if row.get(d.response_column) is not None:
            yield str(row.get(d.prompt_column) or ""), str(row[d.response_column])
        elif row.get(d.text_column) is not None:
            yield str(row[d.text_column]), None
        else:
            raise DataError(
                f"{where} row {r}: no '{d.text_column}' value (data.text_column) and no "
                f"'{d.prompt_column}'/'{d.response_column}' values; it has: {', '.join(row)}"
            )


def lm_rows(ds: Any, cfg: Config) -> Any:
    """The rows of a split with only the columns an LM record reads (images and labels are never decoded)."""
    d = cfg.data
    keep = [c for c in (d.text_column, d.prompt_column, d.response_column) if c in column_names(ds)]
    return ds.select_columns(keep) if keep else ds


def build_lm_data(cfg: Config, bundle: Any, hub: HubSplits) -> Any:
    """tasks.build_lm_data for a `datasets` source: the same tokenisation, packing, caps and cache as a JSONL file
    of `text` (or prompt/response) records, one record per row. The cache is keyed by the split's fingerprint."""

    d = cfg.data
    cache = Path(cfg.output_dir) / "cache"

    def blocks(which: str, cap: int | None) -> lm.BlockDataset | None:
        ds = getattr(hub, which)
        if ds is None:
            return None
        where = f"data.dataset_name '{hub.name}' split '{hub.split_names[which]}'"
        fingerprint = getattr(ds, "_fingerprint", None)
        key = f"{hub.name}:{hub.split_names[which]}:{fingerprint}".encode() if fingerprint else None
        try:
            records = lambda: lm_records(lm_rows(ds, cfg), cfg, where)  # noqa: E731
            tail = which != "train"  # val/test: scored as `fulltune evaluate` scores the split
            return lm.cached_blocks(key, records, d, bundle.tokenizer, cache, cap, cfg.training.seed, tail)
        except DataError as err:  # (pack's "fewer than one block" names no source)
            message = str(err)
            raise DataError(message if message.startswith(where) else f"{where}: {message}") from None

    return block_task_data(cfg, blocks, lm.collate_blocks)
