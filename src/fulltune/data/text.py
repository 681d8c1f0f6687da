"""Text classification data: CSV/TSV/JSONL tables -> label ids -> token ids (tokenised once) -> padded batches.

Every bad input (missing file or column, empty file, empty label, a label that train lacks) is a DataError whose
message names the file and row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.errors import DataError

TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}


def find_split_file(data_dir: str | Path, split: str) -> Path | None:
    root = Path(data_dir)
    for stem in SPLIT_NAMES[split]:
        for ext in (".csv", ".tsv", ".jsonl", ".json"):
            if (root / f"{stem}{ext}").is_file():
                return root / f"{stem}{ext}"
    return None


def split_files(cfg: DataConfig) -> dict[str, Path | None]:
    """The train/val/test files: explicit *_file keys win over what data_dir holds."""
    files: dict[str, Path | None] = {}
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data folder '{cfg.data_dir}' does not exist")
    for split in ("train", "val", "test"):
        explicit = getattr(cfg, f"{split}_file")
        if explicit is not None:
            if not Path(explicit).is_file():
                raise DataError(f"data.{split}_file '{explicit}' does not exist")
            files[split] = Path(explicit)
        else:
            files[split] = find_split_file(cfg.data_dir, split) if cfg.data_dir else None
    return files


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return TABLE_EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"'{path}': cannot tell the format from the extension; set data.format") from None


def jsonl_objects(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL text; anything but a JSON object is an error."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"'{path}' line {lineno}: not valid JSON ({err.msg})") from None
        # `in` on a JSON string would be a substring test: insist on objects.
        if not isinstance(row, dict):
            raise DataError(f"'{path}' line {lineno}: expected a JSON object per line")
        out.append((lineno, row))
    return out


def read_table(path: str | Path, fmt: str = "auto") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and the column names of a CSV/TSV/JSONL file."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"'{path}' is empty")
    if fmt == "jsonl":
        rows = [row for _, row in jsonl_objects(path, text)]
        columns = sorted({k for r in rows for k in r})
        return rows, columns
    # TSV files of the GLUE kind have stray quote characters; they are never quoted, so read them literally.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
    rows = list(reader)
    columns = list(reader.fieldnames or [])
    if not rows:
        raise DataError(f"'{path}' has a header but no rows")
    return rows, columns


@dataclass
class TextExamples:
    texts: list[str]
    labels: list[str]
    source: str


def read_examples(path: Path, cfg: DataConfig, need_labels: bool = True) -> TextExamples:
    rows, columns = read_table(path, cfg.format)
    for col in [cfg.text_column] + ([cfg.label_column] if need_labels else []):
        if col not in columns:
            key = "data.text_column" if col == cfg.text_column else "data.label_column"
            raise DataError(f"'{path}': no column '{col}' ({key}); the file has columns: {', '.join(columns)}")
    texts, labels = [], []
    # Row numbers are 1-based data rows; in CSV/TSV the header is line 1, so data row r is on line r + 1.
    for r, row in enumerate(rows, start=1):
        text = row.get(cfg.text_column)
        if text is None or (isinstance(text, str) and not text.strip()):
            raise DataError(f"'{path}' row {r}: empty text in column '{cfg.text_column}'")
        texts.append(str(text).strip())
        if need_labels:
            label = row.get(cfg.label_column)
            if label is None or str(label).strip() == "":
                raise DataError(f"'{path}' row {r}: empty label in column '{cfg.label_column}'")
            labels.append(str(label).strip())
    return TextExamples(texts, labels, str(path))


def label_vocabulary(labels: list[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer (so '10' comes after '9')."""
    unique = set(labels)
    if all(lbl.lstrip("-").isdigit() for lbl in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def label_ids(examples: TextExamples, vocab: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(vocab)}
    ids = []
    for r, lbl in enumerate(examples.labels, start=1):
        if lbl not in index:
            raise DataError(
                f"'{examples.source}' row {r}: label '{lbl}' is not among the train labels ({', '.join(vocab)})"
            )
        ids.append(index[lbl])
    return ids


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from a text, for hash-based splits."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little") / 2**64


def holdout_split(examples: TextExamples, fraction: float) -> tuple[TextExamples, TextExamples]:
    """Carve a validation set out of train by a hash of each text (stable across runs and row order)."""
    keep = [hash_fraction(t) >= fraction for t in examples.texts]

    def pick(want: bool) -> TextExamples:
        rows = [(t, lb) for t, lb, k in zip(examples.texts, examples.labels, keep, strict=True) if k == want]
        return TextExamples([t for t, _ in rows], [lb for _, lb in rows], examples.source)

    train, val = pick(True), pick(False)
    return train, val


def cap(examples: TextExamples, n: int | None, seed: int) -> TextExamples:
    if n is None or n >= len(examples.texts):
        return examples
    order = list(range(len(examples.texts)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[:n])
    return TextExamples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep], examples.source)


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids held as one tensor each, tokenised once up front (never per batch)."""

    def __init__(self, input_ids: list[list[int]], labels: list[int] | None) -> None:
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in input_ids]
        self.labels = labels
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    # Tokenise in chunks so a large file never holds every intermediate encoding at once.
    out: list[list[int]] = []
    for start in range(0, len(texts), 4096):
        enc = tokenizer(texts[start : start + 4096], truncation=True, max_length=max_length)
        out.extend(enc["input_ids"])
    return out


class PadCollator:
    """Pads a list of examples to the longest one in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return batch
