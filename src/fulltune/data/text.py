"""Text classification and regression data: CSV/TSV/JSONL tables -> label ids (or numbers) -> token ids (tokenised
once; a sentence pair as the tokenizer's pair) -> padded batches.

Every bad input (missing file or column, empty file, empty label, a label that train lacks) is a DataError whose
message names the file and row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.data.records import capped
from fulltune.errors import DataError

TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}
PAIR_COLUMNS = (
    ("text", "text_pair"),
    ("text_a", "text_b"),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question", "context"),
)
"""Column pairs read as sentence pairs without data.text_pair_column: (first text, second text)."""


def run_inputs(cfg: Any) -> list[str]:
    """What a run reads from disk or the hub: the split files or folders of data.data_dir (train.csv, val/, ...: a
    data folder may hold the run's output folder beside them), the data files, the `datasets` source and the model.
    An output folder may be none of them, nor lie inside or above one (`rundir.claim_output`)."""
    d = cfg.data
    found: list[str] = [p for p in (d.train_file, d.val_file, d.test_file, d.dataset_name) if p]
    root = Path(d.data_dir) if d.data_dir else None
    if root is not None and root.is_dir():
        stems = {stem for names in SPLIT_NAMES.values() for stem in names}
        found += [str(p) for p in sorted(root.iterdir()) if p.name.split(".")[0] in stems]
    return found + [cfg.model.name_or_path]


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
    for split in ("train", "val", "test") if cfg.read_test else ("train", "val"):
        explicit = getattr(cfg, f"{split}_file")
        if explicit is not None:
            if not Path(explicit).is_file():
                raise DataError(f"data.{split}_file '{explicit}' does not exist")
            files[split] = Path(explicit)
        else:
            files[split] = find_split_file(cfg.data_dir, split) if cfg.data_dir else None
    files.setdefault("test", None)  # data.read_test false: the test split is never read
    return files


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return TABLE_EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"'{path}': cannot tell the format from the extension; set data.format") from None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """A whole text file; a byte that is not `encoding` is an error naming the file and its byte offset. A UTF-8
    byte-order mark is dropped."""
    raw = Path(path).read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as err:
        raise DataError(
            f"'{path}': byte offset {err.start} is not valid {encoding} ({err.reason}); convert the file to UTF-8 "
            "or set data.encoding (e.g. data.encoding=latin-1)"
        ) from None


def first_jsonl_record(path: Path, encoding: str) -> dict[str, Any] | None:
    """The first record of a JSONL file, or None when it is not a readable JSON object: what `task: auto`'s layout
    detectors look at (the reader that runs next names whatever is wrong with the file)."""
    try:
        with open(path, encoding=encoding, errors="replace") as f:
            first = next((line for line in f if line.strip()), "").lstrip("\ufeff")
        row = json.loads(first)
    except (OSError, ValueError, LookupError):
        return None
    return row if isinstance(row, dict) else None


def jsonl_objects(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL text; anything but a JSON object is an error.

    Lines end at \\n only (\\r\\n too): U+2028, U+0085 or a form feed inside a JSON string are text, not ends of lines.
    """
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
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


def _csv_records(path: Path, text: str, delimiter: str, quoting: int) -> tuple[list[list[str]], list[int]]:
    """Records of a CSV/TSV text and the file line each starts on (a quoted field may span lines). A field may be as
    long as the text itself (the csv module's own limit, 128 KiB, would refuse a long document)."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    records, lines, start = [], [], 1
    try:
        for record in reader:
            if record and any(field != "" for field in record):
                records.append(record)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise csv.Error(f"record from line {start}: {err}") from None
    return records, lines


def read_table(path: str | Path, fmt: str = "auto", encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (dicts) and the column names of a CSV/TSV/JSONL file; each row carries its file line under `_line`.

    CSV and TSV go through the csv module: a quoted field keeps its tabs, commas, quotes and line breaks, and any
    Unicode (U+2028, U+0085, form feeds) is text. TSV files of the GLUE kind are never quoted and hold stray quote
    characters: a TSV that does not parse as quoted (a quote in the middle of a field) is read literally. A row with
    more or fewer fields than the header is an error naming the line and both counts.
    """
    path = Path(path)
    fmt = _format_of(path, fmt)
    text = read_text_file(path, encoding)
    if not text.strip():
        raise DataError(f"'{path}' is empty")
    if fmt == "jsonl":
        rows = [row | {"_line": lineno} for lineno, row in jsonl_objects(path, text)]
        columns = sorted({k for r in rows for k in r if k != "_line"})
        return rows, columns
    delimiter = "\t" if fmt == "tsv" else ","
    try:
        records, lines = _csv_records(path, text, delimiter, csv.QUOTE_MINIMAL)
    except csv.Error as err:
        if fmt != "tsv":
            raise DataError(f"'{path}': not a valid CSV file ({err})") from None
        records, lines = _csv_records(path, text, delimiter, csv.QUOTE_NONE)
    if not records:
        raise DataError(f"'{path}' is empty")
    columns = records[0]
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:  # a dict of the row would keep the last such column, silently
        raise DataError(f"'{path}' line {lines[0]}: the header names column {', '.join(map(repr, twice))} twice")
    rows = []
    for record, line in zip(records[1:], lines[1:], strict=True):
        if len(record) != len(columns):
            raise DataError(
                f"'{path}' row {len(rows) + 1} (line {line}): {len(record)} fields, but the header has "
                f"{len(columns)} ({', '.join(columns)})" + (" (a tab inside an unquoted text?)" if fmt == "tsv" else "")
            )
        rows.append(dict(zip(columns, record, strict=True)) | {"_line": line})
    if not rows:
        raise DataError(f"'{path}' has a header but no rows")
    return rows, columns


@dataclass
class TextExamples:
    texts: list[str]
    labels: list[str]
    source: str
    lines: list[int] | None = None
    """File line of each example (for error messages); None when examples were derived (split, capped)."""
    pairs: list[str] | None = None
    """Each example's second text (sentence pairs: data.text_pair_column); None for single texts."""
    columns: tuple[str, str | None] | None = None
    """The columns the texts (and second texts) came from (`text_columns`); None when not read from a table."""

    def pick(self, idx: list[int]) -> TextExamples:
        """The examples at `idx`, in that order."""
        lines = [self.lines[i] for i in idx] if self.lines is not None else None
        pairs = [self.pairs[i] for i in idx] if self.pairs is not None else None
        texts, labels = [self.texts[i] for i in idx], [self.labels[i] for i in idx]
        return TextExamples(texts, labels, self.source, lines, pairs, self.columns)

    def where(self, i: int) -> str:
        """'row R (line L)' of example i."""
        line = f" (line {self.lines[i]})" if self.lines is not None else ""
        return f"row {i + 1}{line}"


def json_label(value: Any, path: Path, line: int, column: str) -> str:
    """One rule for JSON label values: strings as written; numbers by value (1, 1.0 and "1" are one class, "1");
    booleans as "true"/"false"; null, lists and objects are errors."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"'{path}' line {line}: label {value} in field '{column}' is not a number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"'{path}' line {line}: label in field '{column}' is {kind}; expected a string or a number")


def text_columns(cfg: DataConfig, columns: list[str]) -> tuple[str, str | None]:
    """(text column, second text column or None) of a table with `columns`: data.text_pair_column when set, else
    the first of PAIR_COLUMNS the table holds whose first column is data.text_column or stands in for a missing one;
    else data.text_column alone. Training, evaluate and predict all read a table's texts by this rule."""
    if cfg.text_pair_column:
        return cfg.text_column, cfg.text_pair_column
    for first, second in PAIR_COLUMNS:
        if first in columns and second in columns and (cfg.text_column == first or cfg.text_column not in columns):
            return first, second
    return cfg.text_column, None


def _cell_text(row: dict[str, Any], column: str, where: str) -> str:
    text = row.get(column)
    if not isinstance(text, str) and text is not None:
        raise DataError(f"{where}: the text in '{column}' is a {type(text).__name__}, not a string")
    if text is None or not text.strip():
        raise DataError(f"{where}: empty text in column '{column}'")
    return text  # as written: the tokenizer decides what whitespace means


def read_examples(
    path: Path, cfg: DataConfig, need_labels: bool = True, read_label: Callable[[Any, str], Any] | None = None
) -> TextExamples:
    """The examples of a table: texts (and second texts of sentence pairs, see `text_columns`) and labels as
    written (numbers as their text: `json_label`). `read_label(value, where)` reads a label cell its own way
    (multi-label sets); by default a label is one class name or number."""
    rows, columns = read_table(path, cfg.format, cfg.encoding)
    first, second = text_columns(cfg, columns)
    keys = {first: "data.text_column", second: "data.text_pair_column", cfg.label_column: "data.label_column"}
    for col in [first] + ([second] if second else []) + ([cfg.label_column] if need_labels else []):
        if col not in columns:
            lm_hint = "; prompt/response records train a causal LM: --task causal_lm"
            lm_hint = lm_hint if cfg.response_column in columns else ""
            raise DataError(
                f"'{path}': no column '{col}' ({keys[col]}); the file has columns: {', '.join(columns)}{lm_hint}"
            )
    texts, labels, lines, pairs = [], [], [], []
    kinds: dict[str, int] = {}  # JSON label kind -> first line holding it: booleans and numbers must not mix
    # Row numbers are 1-based data rows; the line is where the row starts in the file.
    for r, row in enumerate(rows, start=1):
        line = row["_line"]
        where = f"'{path}' row {r} (line {line})"
        texts.append(_cell_text(row, first, where))
        if second:
            pairs.append(_cell_text(row, second, where))
        lines.append(line)
        if need_labels and read_label is not None:
            labels.append(read_label(row.get(cfg.label_column), where))
        elif need_labels:
            raw = row.get(cfg.label_column)
            if isinstance(raw, (bool, int, float)) or (raw is not None and not isinstance(raw, str)):
                kind = "boolean" if isinstance(raw, bool) else "number"
                kinds.setdefault(kind, line)
                if len(kinds) > 1:
                    raise DataError(
                        f"{where}: label {json.dumps(raw)} mixes booleans and numbers in "
                        f"'{cfg.label_column}' (line {kinds['boolean']} has a boolean, line "
                        f"{kinds['number']} a number); write the labels one way"
                    )
                label = json_label(raw, path, line, cfg.label_column)
            else:
                label = "" if raw is None else raw.strip()
            if label == "":
                raise DataError(f"{where}: empty label in column '{cfg.label_column}'")
            labels.append(label)
    return TextExamples(texts, labels, str(path), lines, pairs if second else None, (first, second))


def label_vocabulary(labels: list[str]) -> list[str]:
    """Sorted label names; numerically when every label is an ASCII integer (so '10' comes after '9'). Labels
    equal as integers ('1' and '01') stay two classes, ordered by their text: the order is total, the same in
    every process whatever its string hash seed."""
    unique = set(labels)
    if all(re.fullmatch(r"-?[0-9]+", lbl) for lbl in unique):
        return sorted(unique, key=lambda lbl: (int(lbl), lbl))
    return sorted(unique)


def output_names(labels: list[str], label_column: str, regression: bool) -> list[str]:
    """The names of a text model's outputs: the label vocabulary (`label_vocabulary`) of a classifier, or a
    regression's one output, named after the column it predicts."""
    return [label_column] if regression else label_vocabulary(labels)


def label_ids(examples: TextExamples, vocab: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(vocab)}
    ids = []
    for i, lbl in enumerate(examples.labels):
        if lbl not in index:
            raise DataError(
                f"'{examples.source}' {examples.where(i)}: label '{lbl}' is not among the train labels "
                f"({', '.join(vocab)})"
            )
        ids.append(index[lbl])
    return ids


def is_regression(labels: list[str]) -> bool:
    """Float labels: every label is a number and at least one is not a whole number (3.8, 0.25, 1e-3). Whole
    numbers (0, 1, 2.0) stay class labels; such scores train a regression with task: text_regression."""
    values = [_number(lbl) for lbl in set(labels)]
    return all(v is not None for v in values) and any(not v.is_integer() for v in values if v is not None)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def regression_targets(examples: TextExamples) -> list[float]:
    """The labels of a regression as numbers; a label that is not a finite number is an error naming its row."""
    out = []
    for i, lbl in enumerate(examples.labels):
        value = _number(lbl)
        if value is None:
            raise DataError(
                f"'{examples.source}' {examples.where(i)}: label '{lbl}' is not a number (text_regression needs a "
                "number in the label column)"
            )
        out.append(value)
    return out


def targets(examples: TextExamples, labels: list[str], regression: bool) -> list[int] | list[float]:
    """What a model learns for each example: its class id in `labels`, or its number (regression)."""
    return regression_targets(examples) if regression else label_ids(examples, labels)


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from a text, for hash-based splits."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little") / 2**64


def holdout_split(examples: TextExamples, fraction: float) -> tuple[TextExamples, TextExamples]:
    """Carve a validation set out of train by a hash of each text (of both texts of a pair; stable across runs and
    row order)."""
    keys = examples.texts
    if examples.pairs is not None:
        keys = [f"{a}\t{b}" for a, b in zip(examples.texts, examples.pairs, strict=True)]
    keep = [hash_fraction(t) >= fraction for t in keys]
    train = examples.pick([i for i, k in enumerate(keep) if k])
    val = examples.pick([i for i, k in enumerate(keep) if not k])
    return train, val


def cap(examples: TextExamples, n: int | None, seed: int) -> TextExamples:
    """The examples a cap of `n` keeps (`records.capped`: seeded, in file order)."""
    if n is None or n >= len(examples.texts):
        return examples
    return examples.pick(capped(len(examples.texts), n, seed))


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids held as one tensor each, tokenised once up front (never per batch); a sentence pair's token type
    ids beside them (where the model has them)."""

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[int] | list[float] | None,
        texts: list[str] | None = None,
        token_type_ids: list[list[int]] | None = None,
    ) -> None:
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in input_ids]
        self.token_type_ids = [torch.tensor(t, dtype=torch.long) for t in token_type_ids] if token_type_ids else None
        self.labels = labels
        self.texts = texts  # the texts as written, for the report's examples (not the decoded tokens)
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of single texts (`encode` without pairs)."""
    return encode(tokenizer, texts, None, max_length)[0]


def encode(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids of each text, or of each sentence pair as the tokenizer pairs them (BERT: [CLS] a [SEP] b [SEP],
    the longer text cut first to fit max_length), and the pairs' token type ids where the tokenizer gives them
    (None for single texts, whose type ids are all 0). Training, evaluate and predict all encode here."""
    # Tokenise in chunks so a large file never holds every intermediate encoding at once.
    ids: list[list[int]] = []
    types: list[list[int]] | None = [] if pairs is not None else None
    for start in range(0, len(texts), 4096):
        second = pairs[start : start + 4096] if pairs is not None else None
        enc = tokenizer(texts[start : start + 4096], second, truncation=True, max_length=max_length)
        ids.extend(enc["input_ids"])
        if types is not None and "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
    return ids, (types or None)


def encoded_dataset(
    examples: TextExamples, labels: list[str], tokenizer: Any, max_length: int, regression: bool = False
) -> TokenizedDataset:
    """The examples encoded (`encode`) with their targets (`targets`): what training and evaluate score."""
    ids, types = encode(tokenizer, examples.texts, examples.pairs, max_length)
    return TokenizedDataset(ids, targets(examples, labels, regression), examples.texts, types)


class PadCollator:
    """Pads a list of examples to the longest one in the batch (dynamic padding); labels are class ids, or floats
    for a regression."""

    def __init__(self, pad_token_id: int, label_dtype: torch.dtype = torch.long) -> None:
        self.pad_token_id = pad_token_id
        self.label_dtype = label_dtype  # class ids; float32 for multi-hot label rows

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        types = torch.zeros((len(items), longest), dtype=torch.long) if "token_type_ids" in items[0] else None
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = it["token_type_ids"]
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        if "labels" in items[0]:
            values = [it["labels"] for it in items]
            dtype = torch.float32 if isinstance(values[0], float) else self.label_dtype  # a regression's numbers
            batch["labels"] = torch.tensor(values, dtype=dtype)
        return batch
