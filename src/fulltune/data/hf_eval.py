"""A split of a Hugging Face `datasets` source for `fulltune evaluate` and `fulltune predict`: the run's
data.dataset_name (or `--dataset_name`), read with the run's columns, turned into what the file readers give.

`--split` names a split of the dataset, or train / val / test, which map to the run's data.train_split,
data.val_split and data.test_split (their defaults when unset). A causal LM split is scored as the text file its
rows would make, one row per line: `load_dataset("text", data_files=FILE)` scores as FILE does.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from fulltune.config import Config
from fulltune.data import hf_datasets as hf
from fulltune.data import text as txt
from fulltune.data.lm import tokenize_records
from fulltune.errors import DataError


@dataclasses.dataclass
class HubSplit:
    """One split, a HubSplits over it (its rows as the "train" member, for the shared readers) and a name to show."""

    ds: Any
    hub: hf.HubSplits
    shown: str


def open_split(cfg: Config, split: str, dataset_name: str | None = None) -> HubSplit:
    """The split `split` of data.dataset_name (or of `dataset_name`, with the run's columns), map-style."""
    d = cfg.data
    if dataset_name and dataset_name != d.dataset_name:
        d = dataclasses.replace(d, dataset_name=dataset_name, dataset_config=None, data_files=None)
    d = dataclasses.replace(d, streaming=False)
    cfg = dataclasses.replace(cfg, data=d)
    name = str(d.dataset_name)
    splits = hf.load_all_splits(cfg, streaming=False)
    if split in splits:
        chosen: str | None = split
    elif split in txt.SPLIT_NAMES["train"]:
        chosen = d.train_split
    elif split in txt.SPLIT_NAMES["val"]:
        chosen = d.val_split or next((s for s in hf.VAL_SPLITS if s in splits), None)
    elif split in txt.SPLIT_NAMES["test"]:
        chosen = d.test_split or "test"
    else:
        chosen = None
    if chosen is None or chosen not in splits:
        raise DataError(f"data.dataset_name '{name}' has no split '{split}'; it has: {', '.join(splits)}")
    ds = splits[chosen]
    feature = hf.features(ds).get(d.label_column)
    names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    hub = hf.HubSplits(name, ds, None, None, {"train": chosen}, names)
    return HubSplit(ds, hub, f"{name}[{chosen}]")


def text_dataset(
    cfg: Config, split: HubSplit, labels: list[str], tokenizer: Any, regression: bool = False
) -> tuple[Any, list[str]]:
    """A labelled split as the TokenizedDataset `evaluate` builds from a table (a sentence pair's two texts, a
    regression's numbers), and its texts."""
    examples = hf.text_examples(split.hub, "train", cfg)
    assert examples is not None
    return txt.encoded_dataset(examples, labels, tokenizer, cfg.data.max_length, regression), list(examples.texts)


def image_dataset(cfg: Config, split: HubSplit, labels: list[str], spec: Any) -> tuple[Any, list[str]]:
    """A labelled image split as the evaluation dataset of an image folder, and a name for each row."""
    d = cfg.data
    hf._check_columns(
        split.ds,
        [(d.image_column, "data.image_column"), (d.label_column, "data.label_column")],
        split.hub.name,
        split.hub.split_names["train"],
    )
    ids = hf._image_ids(split.hub, split.ds, "train", labels, d.label_column)
    rows = list(range(len(split.ds)))
    dataset = hf.HubImageDataset(split.ds, rows, ids, spec, None, split.shown, d.image_column)
    return dataset, [f"{split.shown} row {r + 1}" for r in rows]


def lm_token_ids(cfg: Config, split: HubSplit, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's token stream and labels, framed as training frames its rows (one record per row)."""

    return tokenize_records(list(hf.lm_records(hf.lm_rows(split.ds, cfg), cfg, split.shown)), tokenizer)


def predict_inputs(cfg: Config, split: HubSplit, task: str) -> tuple[list[Any], list[str]]:
    """`fulltune predict` inputs from a split: texts (or prompts) from data.text_column, or images (as file-like
    objects) from data.image_column; and what each output line names as its input."""
    d = cfg.data
    if task == "image_classification":
        datasets = hf._datasets()
        hf._check_columns(split.ds, [(d.image_column, "data.image_column")], split.hub.name, split.shown)
        cells = split.ds.select_columns([d.image_column]).cast_column(d.image_column, datasets.Image(decode=False))
        images = [io.BytesIO(c["bytes"]) if c.get("bytes") else c.get("path") for c in cells[d.image_column]]
        return images, [f"{split.shown} row {r + 1}" for r in range(len(images))]
    wanted = [(d.text_column, "data.text_column")] + (
        [(d.text_pair_column, "data.text_pair_column")] * bool(d.text_pair_column)
    )
    hf._check_columns(split.ds, wanted, split.hub.name, split.shown)
    texts = [str(t or "").strip() for t in hf.column_values(split.ds, d.text_column)]
    if d.text_pair_column:  # sentence pairs: (first, second) per row
        pairs = [str(t or "").strip() for t in hf.column_values(split.ds, d.text_pair_column)]
        both = list(zip(texts, pairs, strict=True))
        return both, both
    return texts, texts
