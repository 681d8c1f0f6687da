"""Multi-label text data: each example carries a set of labels, written as a JSON list (`"label": ["a", "b"]`) or
as one text cell split at data.label_separator (`"a|b"`), in CSV/TSV/JSONL tables or a `datasets` list column
(a Sequence of ClassLabel, or of strings). Sets become multi-hot float rows (batch, num_labels) for the BCE loss.
The per-label decision thresholds tuned on validation live beside the weights in thresholds.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, DataConfig
from fulltune.data import hf_datasets
from fulltune.data import text as txt
from fulltune.data.records import TaskData, capped_splits, worker_count
from fulltune.errors import DataError

THRESHOLDS_FILE = "thresholds.json"


def _list_feature(feature: Any) -> Any:
    """The element feature of a `datasets` list column (Sequence, List, LargeList), else None."""
    return getattr(feature, "feature", None) if type(feature).__name__ in ("Sequence", "List", "LargeList") else None


def is_multi_label(cfg: Config) -> bool:
    """Whether the data holds label sets: data.label_separator is set, a `datasets` label column is a list, or the
    first row of a JSONL training table has a list in its label field."""
    d = cfg.data
    if d.label_separator:
        return True
    if d.dataset_name:
        splits = hf_datasets.load_all_splits(cfg)
        train = splits.get(d.train_split)
        return train is not None and _list_feature(hf_datasets.features(train).get(d.label_column)) is not None
    folder = Path(d.data_dir) if d.data_dir and Path(d.data_dir).is_dir() else None
    train = Path(d.train_file) if d.train_file else (txt.find_split_file(folder, "train") if folder else None)
    if train is None or not train.is_file() or d.format not in ("auto", "jsonl"):
        return False
    if d.format == "auto" and txt.TABLE_EXTENSIONS.get(train.suffix.lower()) != "jsonl":
        return False
    row = txt.first_jsonl_record(train, d.encoding)
    return row is not None and isinstance(row.get(d.label_column), list)


def label_reader(cfg: DataConfig) -> Any:
    """`read_label(value, where)` for txt.read_examples: a label cell as a tuple of label names (duplicates once,
    in the order written). A JSON list holds names (strings or numbers); a text cell is split at
    data.label_separator; an empty list or cell is an example with no label."""

    def read_label(value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            raise DataError(f"{where}: no labels in field '{cfg.label_column}' (write [] for an example with none)")
        if isinstance(value, list):
            names = []
            for item in value:
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise DataError(
                        f"{where}: label {json.dumps(item)} in the list in field '{cfg.label_column}' is not a "
                        "string or a number"
                    )
                names.append(
                    str(item).strip() if not isinstance(item, float) or not item.is_integer() else str(int(item))
                )
        elif isinstance(value, str):
            names = [n.strip() for n in value.split(cfg.label_separator)] if cfg.label_separator else [value.strip()]
            while names and names[-1] == "":  # "a|b|": a separator at the end ends the list
                names.pop()
        else:
            raise DataError(
                f"{where}: label {json.dumps(value)} in field '{cfg.label_column}' is not a list of labels or a text "
                + (
                    f"of labels separated by {cfg.label_separator!r}"
                    if cfg.label_separator
                    else "(set data.label_separator)"
                )
            )
        if "" in names:
            raise DataError(f"{where}: an empty label among {names} in field '{cfg.label_column}'")
        return tuple(dict.fromkeys(names))

    return read_label


def read_examples(path: Path, cfg: DataConfig) -> txt.TextExamples:
    """A table's texts and label sets (TextExamples whose labels are tuples of names)."""
    return txt.read_examples(path, cfg, read_label=label_reader(cfg))


def hub_examples(hub: hf_datasets.HubSplits, which: str, cfg: Config) -> txt.TextExamples | None:
    """One `datasets` split as TextExamples with label sets: a list column of ClassLabel ids (named by the
    feature) or of names."""
    ds = getattr(hub, which)
    if ds is None:
        return None
    split, d = hub.split_names[which], cfg.data
    where = f"data.dataset_name '{hub.name}' split '{split}'"
    have = hf_datasets.column_names(ds)
    for col, key in ((d.text_column, "data.text_column"), (d.label_column, "data.label_column")):
        if col not in have:
            raise DataError(f"{where}: no column '{col}' ({key}); it has: {', '.join(have)}")
    inner = _list_feature(hf_datasets.features(ds).get(d.label_column))
    names = list(inner.names) if type(inner).__name__ == "ClassLabel" else None
    plain = _hub_texts(hub, which, cfg)
    read_label = label_reader(d)
    labels = []
    for r, value in enumerate(hf_datasets.column_values(ds, d.label_column), start=1):
        if names is not None and isinstance(value, list):
            if any(not 0 <= v < len(names) for v in value):
                raise DataError(f"{where} row {r}: label id outside the {len(names)} classes of '{d.label_column}'")
            value = [names[v] for v in value]
        labels.append(read_label(value, f"{where} row {r}"))
    return txt.TextExamples(plain.texts, labels, plain.source)


def _hub_texts(hub: hf_datasets.HubSplits, which: str, cfg: Config) -> txt.TextExamples:
    """The texts of a split, stripped; an empty one is an error naming the row."""
    d = cfg.data
    texts = [
        str(t).strip() if t is not None else "" for t in hf_datasets.column_values(getattr(hub, which), d.text_column)
    ]
    for r, t in enumerate(texts, start=1):
        if not t:
            split = hub.split_names[which]
            raise DataError(
                f"data.dataset_name '{hub.name}' split '{split}' row {r}: empty text in column '{d.text_column}'"
            )
    return txt.TextExamples(texts, [], f"{hub.name}[{hub.split_names[which]}]")


def label_vocabulary(examples: txt.TextExamples) -> list[str]:
    """Every label name of the training sets, sorted as single-label classes are (`txt.label_vocabulary`)."""
    return txt.label_vocabulary([name for names in examples.labels for name in names])


def multi_hot(examples: txt.TextExamples, vocab: list[str]) -> list[list[float]]:
    """(examples, labels) rows of 0/1; a label that train lacks is an error naming the row."""
    index = {name: i for i, name in enumerate(vocab)}
    rows = []
    for i, names in enumerate(examples.labels):
        row = [0.0] * len(vocab)
        for name in names:
            if name not in index:
                raise DataError(
                    f"'{examples.source}' {examples.where(i)}: label '{name}' is not among the train labels "
                    f"({', '.join(vocab)})"
                )
            row[index[name]] = 1.0
        rows.append(row)
    return rows


def read_labels(cfg: Config) -> tuple[list[str], Any]:
    """The label vocabulary and what was read: ({"train", "val", "test"}: TextExamples or a file still to read,
    the train examples), as tasks.read_labels returns it for text classification."""
    d = cfg.data
    if d.streaming:
        raise DataError("multi_label_classification reads data.dataset_name whole: set data.streaming=false")
    if d.dataset_name:
        hub = hf_datasets.open_splits(cfg)
        train = hub_examples(hub, "train", cfg)
        assert train is not None
        files: dict[str, Any] = {"train": None, "val": hub_examples(hub, "val", cfg)}
        files["test"] = hub_examples(hub, "test", cfg)
    else:
        files = txt.split_files(d)
        if files["train"] is None:
            raise DataError(f"no training table: expected train.csv/.tsv/.jsonl in '{d.data_dir}' or data.train_file")
        train = read_examples(files["train"], d)
    labels = label_vocabulary(train)
    if len(labels) < 2:
        where = f"'{train.source}'"
        raise DataError(
            f"{where}: the training data has {len(labels)} label ({', '.join(labels) or 'none'}); multi-label "
            "classification (label lists or data.label_separator) needs at least 2"
        )
    if d.num_classes is not None and d.num_classes != len(labels):
        raise DataError(f"data.num_classes={d.num_classes} but the training data has {len(labels)} labels")
    return labels, (files, train)


def encoded(examples: txt.TextExamples, vocab: list[str], tokenizer: Any, max_length: int) -> txt.TokenizedDataset:
    """The examples encoded as every text task encodes them (`text.encode`: single texts or sentence pairs) with
    their multi-hot label rows: what training and evaluate score."""
    ids, types = txt.encode(tokenizer, examples.texts, examples.pairs, max_length)
    return txt.TokenizedDataset(ids, multi_hot(examples, vocab), examples.texts, types)  # type: ignore[arg-type]


def build_data(cfg: Config, bundle: Any, labels: list[str], raw: Any) -> TaskData:
    """Tokenised splits with multi-hot labels; a missing validation split is held out of train by text hash."""
    files, train = raw
    d = cfg.data
    val = files["val"] if not isinstance(files["val"], Path) else read_examples(files["val"], d)
    test = files["test"] if not isinstance(files["test"], Path) else read_examples(files["test"], d)
    info: dict[str, Any] = {}
    if val is None and d.val_fraction > 0:
        train, val = txt.holdout_split(train, d.val_fraction)
        info["val_source"] = f"{d.val_fraction:.0%} of train (by text hash)"
    train, val, info["caps"] = capped_splits(cfg, train, val, txt.cap, lambda e: len(e.texts), "texts")
    tok = bundle.tokenizer
    train_ds = encoded(train, labels, tok, d.max_length)
    return TaskData(
        train=train_ds,
        val=encoded(val, labels, tok, d.max_length) if val else None,
        test=encoded(test, labels, tok, d.max_length) if test else None,
        collate=txt.PadCollator(tok.pad_token_id, label_dtype=torch.float32),
        labels=labels,
        lengths=train_ds.lengths,
        num_workers=worker_count(cfg, 0),
        info=info,
    )


# ---------------------------------------------------------------- thresholds beside the weights


def write_thresholds(folder: Path, meta: dict[str, Any]) -> None:
    """thresholds.json ({"thresholds": {label: threshold}}, tuned on the validation split) beside the weights when
    the run record `meta` holds tuned thresholds; evaluate and predict read it back."""
    if not meta.get("thresholds"):
        return
    table = dict(zip(meta["labels"], (round(float(t), 6) for t in meta["thresholds"]), strict=True))
    (Path(folder) / THRESHOLDS_FILE).write_text(json.dumps({"thresholds": table}, indent=2), encoding="utf-8")


def read_thresholds(folder: Path, labels: list[str], default: float) -> list[float]:
    """Each label's threshold: thresholds.json's when the folder has one, else `default` (eval.threshold)."""
    path = Path(folder) / THRESHOLDS_FILE
    if not path.is_file():
        return [default] * len(labels)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))["thresholds"]
        return [float(table[name]) for name in labels]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"'{path}': expected {{\"thresholds\": {{label: number}}}} for every label ({err})") from None
