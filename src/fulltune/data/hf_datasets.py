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
from fulltune.data import text as txt
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


def load_all_splits(cfg: Config) -> dict[str, Any]:
    """Every split of data.dataset_name, as (memory-mapped) map-style `datasets.Dataset`s."""
    ds_lib = _datasets()
    d = cfg.data
    name = str(d.dataset_name)
    try:
        if _is_saved_folder(Path(name)):
            loaded = ds_lib.load_from_disk(name)
        else:
            loaded = ds_lib.load_dataset(name, d.dataset_config, data_files=d.data_files)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.dataset_name '{name}': cannot load it ({first})") from None
    if isinstance(loaded, ds_lib.Dataset):  # a single saved split
        return {d.train_split: loaded}
    return dict(loaded)


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
    for col, key in columns:
        if col not in ds.column_names:
            raise DataError(
                f"data.dataset_name '{name}' split '{split}': no column '{col}' ({key}); "
                f"it has: {', '.join(ds.column_names)}"
            )


def _has_labels(ds: Any, label_column: str) -> bool:
    """Unlabelled test splits (GLUE's hold -1 or None) are not used for test metrics."""
    if label_column not in ds.column_names:
        return False
    return all(v is not None and v != -1 for v in ds[label_column])


def open_splits(cfg: Config) -> HubSplits:
    d = cfg.data
    name = str(d.dataset_name)
    splits = load_all_splits(cfg)
    train = _pick(splits, d.train_split, (), "data.train_split", name)
    val = _pick(splits, d.val_split, VAL_SPLITS, "data.val_split", name)
    test = _pick(splits, d.test_split, ("test",), "data.test_split", name)
    if test is not None and d.test_split is None and not _has_labels(splits[test], d.label_column):
        test = None  # the default test split is used only when it carries labels
    feature = splits[train].features.get(d.label_column)
    names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    return HubSplits(
        name,
        splits[train],
        splits[val] if val else None,
        splits[test] if test else None,
        {"train": train, "val": val, "test": test},
        names,
    )


def is_image_dataset(cfg: Config) -> bool:
    """True when the train split's data.image_column is an `Image` feature."""
    splits = load_all_splits(cfg)
    train = splits.get(cfg.data.train_split)
    if train is None:
        raise DataError(
            f"data.dataset_name '{cfg.data.dataset_name}' has no split '{cfg.data.train_split}' "
            f"(data.train_split); it has: {', '.join(splits)}"
        )
    feature = train.features.get(cfg.data.image_column)
    return type(feature).__name__ == "Image"


def infer_task(cfg: Config) -> str:
    return "image_classification" if is_image_dataset(cfg) else "text_classification"


def _label_names(ds: Any, hub: HubSplits, split: str, column: str) -> list[str]:
    out = []
    for r, value in enumerate(ds[column], start=1):
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
    for r, text in enumerate(ds[d.text_column], start=1):
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


def read_labels(cfg: Config, task: str) -> tuple[list[str], Any]:
    """What tasks.read_labels returns for files: the label vocabulary and what was read."""
    if task not in ("text_classification", "image_classification"):
        raise ConfigError(
            f"data.dataset_name serves text_classification and image_classification; for {task} give "
            "data.train_file (a .txt or .jsonl file)"
        )
    hub = open_splits(cfg)
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
        im = self.image(index, draft=train)
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


def build_image_data(cfg: Config, bundle: Any, labels: list[str], hub: HubSplits) -> Any:
    """tasks.build_image_data for a `datasets` source; the same hold-out rule as image folders (file-name hash)."""
    from fulltune.tasks import TaskData, _workers

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
        num_workers=_workers(cfg, 2),
        info=info,
    )
