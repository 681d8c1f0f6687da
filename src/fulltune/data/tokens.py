"""Token classification data (named-entity recognition and other tagging): CoNLL-style files (a token column and a
tag column, whitespace separated, a blank line between sentences, `-DOCSTART-` lines skipped) and JSONL records
(a list of tokens and a list of tags) -> words and tags -> sub-token ids with each word's tag on its first
sub-token (the others -100, ignored by the loss) -> padded batches.

Every bad input is a DataError naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.data.hf_datasets import HubSplits, column_names, column_values, features
from fulltune.data.records import capped
from fulltune.data.text import SPLIT_NAMES, first_jsonl_record, hash_fraction, jsonl_objects, read_text_file
from fulltune.errors import ConfigError, DataError

IGNORE = -100
"""The label of a sub-token that is not the first of its word, and of special tokens and padding."""
CONLL_EXTENSIONS = (".conll", ".txt", ".tsv", ".iob", ".bio")
JSONL_EXTENSIONS = (".jsonl", ".json")
DOCSTART = "-DOCSTART-"


@dataclass
class TaggedSentences:
    words: list[list[str]]
    tags: list[list[str]]
    source: str
    lines: list[int] | None = None
    """File line each sentence starts on (for error messages); None once derived (split, capped)."""

    def where(self, i: int) -> str:
        return f"sentence {i + 1}" + (f" (line {self.lines[i]})" if self.lines is not None else "")

    def pick(self, keep: list[int]) -> TaggedSentences:
        lines = [self.lines[i] for i in keep] if self.lines is not None else None
        return TaggedSentences([self.words[i] for i in keep], [self.tags[i] for i in keep], self.source, lines)


# ---------------------------------------------------------------- finding and recognising the files


def find_split_file(data_dir: str | Path, split: str) -> Path | None:
    """<split>.conll (or .txt, .tsv, .iob, .bio, .jsonl, .json) in a data folder; dev/valid/validation name val."""
    root = Path(data_dir)
    for stem in SPLIT_NAMES[split]:
        for ext in (*CONLL_EXTENSIONS, *JSONL_EXTENSIONS):
            if (root / f"{stem}{ext}").is_file():
                return root / f"{stem}{ext}"
    return None


def split_files(cfg: DataConfig) -> dict[str, Path | None]:
    """The train/val/test files: data.<split>_file wins over what data.data_dir holds."""
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data folder '{cfg.data_dir}' does not exist")
    files: dict[str, Path | None] = {}
    for split in ("train", "val", "test"):
        explicit = getattr(cfg, f"{split}_file")
        if explicit is not None and not Path(explicit).is_file():
            raise DataError(f"data.{split}_file '{explicit}' does not exist")
        found = find_split_file(cfg.data_dir, split) if cfg.data_dir else None
        files[split] = Path(explicit) if explicit is not None else found
    if files["train"] is None:
        raise DataError(
            f"no training file for token_classification: expected train.conll/.txt/.jsonl in '{cfg.data_dir}' "
            "or data.train_file"
        )
    return files


def is_token_data(cfg: DataConfig) -> bool:
    """Whether the training data is token-tagged (what `task: auto` reads): a .conll file, or JSONL whose first
    record holds the token and tag lists (data.tokens_column, data.tags_column)."""
    train = Path(cfg.train_file) if cfg.train_file else None
    if train is None and cfg.data_dir and Path(cfg.data_dir).is_dir():
        train = next((p for p in sorted(Path(cfg.data_dir).glob("train.*")) if p.suffix.lower() == ".conll"), None)
        jsonl = (Path(cfg.data_dir) / f"train{e}" for e in JSONL_EXTENSIONS)
        train = train or next((p for p in jsonl if p.is_file()), None)
    if train is None or not train.is_file():
        return False
    if train.suffix.lower() == ".conll":
        return True
    if train.suffix.lower() not in JSONL_EXTENSIONS:
        return False
    row = first_jsonl_record(train, cfg.encoding)
    return row is not None and isinstance(row.get(cfg.tokens_column), list) and cfg.tags_column in row


# ---------------------------------------------------------------- reading


def read_sentences(path: Path, cfg: DataConfig, need_tags: bool = True) -> TaggedSentences:
    """Words and tags of a CoNLL-style or JSONL file (JSONL by its extension .jsonl/.json). need_tags=False
    (prediction): a CoNLL file may hold the words alone, and a JSONL record needs no tags (they come back empty)."""
    text = read_text_file(path, cfg.encoding)
    if not text.strip():
        raise DataError(f"'{path}' is empty")
    read = _read_jsonl if path.suffix.lower() in JSONL_EXTENSIONS else _read_conll
    out = read(path, text, cfg, need_tags)
    if not out.words:
        raise DataError(f"'{path}' holds no tagged sentence")
    return out


def _column(fields: list[str], index: int, key: str, path: Path, lineno: int) -> str:
    try:
        return fields[index]
    except IndexError:
        raise DataError(
            f"'{path}' line {lineno}: {len(fields)} column(s), but {key} is {index}; expected a token column and a "
            "tag column separated by whitespace"
        ) from None


def _read_conll(path: Path, text: str, cfg: DataConfig, need_tags: bool) -> TaggedSentences:
    """One token per line (columns split on whitespace), a blank line between sentences, -DOCSTART- skipped."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    sent_w: list[str] = []
    sent_t: list[str] = []
    for lineno, line in enumerate([*text.split("\n"), ""], start=1):
        fields = line.split()
        if fields and fields[0] == DOCSTART:
            fields = []
        if not fields:
            if sent_w:
                words.append(sent_w)
                tags.append(sent_t)
                sent_w, sent_t = [], []
            continue
        if len(fields) < 2 and need_tags:
            raise DataError(
                f"'{path}' line {lineno}: one column ({line.strip()!r}); expected a token and a tag separated by "
                "whitespace, and a blank line between sentences"
            )
        if not sent_w:
            lines.append(lineno)
        sent_w.append(_column(fields, cfg.token_column_index, "data.token_column_index", path, lineno))
        if need_tags:
            sent_t.append(_column(fields, cfg.tag_column_index, "data.tag_column_index", path, lineno))
    return TaggedSentences(words, tags, str(path), lines)


def _read_jsonl(path: Path, text: str, cfg: DataConfig, need_tags: bool) -> TaggedSentences:
    words, tags, lines = [], [], []
    for lineno, row in jsonl_objects(path, text):
        tok, tag = row.get(cfg.tokens_column), row.get(cfg.tags_column)
        if not need_tags and isinstance(tok, list):
            tag = [""] * len(tok) if not isinstance(tag, list) or len(tag) != len(tok) else tag
        for value, name, key in ((tok, cfg.tokens_column, "tokens"), (tag, cfg.tags_column, "tags")):
            if not isinstance(value, list):
                kind = "missing" if value is None else f"a {type(value).__name__}"
                raise DataError(
                    f"'{path}' line {lineno}: field '{name}' (data.{key}_column) is {kind}; expected a list of strings"
                )
        if len(tok) != len(tag):
            raise DataError(f"'{path}' line {lineno}: {len(tok)} tokens but {len(tag)} tags; expected one tag a token")
        if not tok:
            continue
        bad = next((v for v in [*tok, *tag] if not isinstance(v, (str, int)) or isinstance(v, bool)), None)
        if bad is not None or any(isinstance(v, str) and not v.strip() for v in [*tok, *(tag if need_tags else [])]):
            raise DataError(f"'{path}' line {lineno}: token or tag {bad!r} is not a non-empty string")
        words.append([str(v) for v in tok])
        tags.append([str(v) for v in tag])
        lines.append(lineno)
    return TaggedSentences(words, tags, str(path), lines)


def hub_sentences(hub: HubSplits, which: str, cfg: DataConfig) -> TaggedSentences | None:
    """One split of a `datasets` source: its data.tokens_column (lists of words) and data.tags_column (lists of tag
    ids of a ClassLabel sequence, named by it, or tag strings), e.g. tokens_column=tokens tags_column=ner_tags."""
    ds = getattr(hub, which)
    if ds is None:
        return None
    where = f"data.dataset_name '{hub.name}' split '{hub.split_names[which]}'"
    for column, key in ((cfg.tokens_column, "data.tokens_column"), (cfg.tags_column, "data.tags_column")):
        if column not in column_names(ds):
            raise DataError(f"{where}: no column '{column}' ({key}); it has: {', '.join(column_names(ds))}")
    names = tag_names(hub, cfg)
    words, tags = [], []
    rows = zip(column_values(ds, cfg.tokens_column), column_values(ds, cfg.tags_column), strict=True)
    for r, (tok, tag) in enumerate(rows, start=1):
        if not isinstance(tok, list) or not isinstance(tag, list) or len(tok) != len(tag):
            raise DataError(f"{where} row {r}: expected lists of words and tags of one length")
        if tok:
            words.append([str(w) for w in tok])
            tags.append([names[t] if names is not None else str(t) for t in tag])
    return TaggedSentences(words, tags, f"{hub.name}[{hub.split_names[which]}]")


def tag_names(hub: HubSplits, cfg: DataConfig) -> list[str] | None:
    """The names of a `datasets` tag column that is a sequence of ClassLabel (ids index them), else None."""
    inner = getattr(features(hub.train).get(cfg.tags_column), "feature", None)
    return list(inner.names) if type(inner).__name__ == "ClassLabel" else None


def tag_vocabulary(tags: list[list[str]]) -> list[str]:
    """The tag names in a stable order: O first, then by entity type, B- before I- (B-LOC, I-LOC, B-PER, ...)."""
    unique = {t for sent in tags for t in sent}
    return sorted(unique, key=lambda t: (t != "O", t[2:] if t[1:2] == "-" else t, t))


def tag_ids(sentences: TaggedSentences, vocab: list[str]) -> list[list[int]]:
    index = {name: i for i, name in enumerate(vocab)}
    out = []
    for i, sent in enumerate(sentences.tags):
        unknown = next((t for t in sent if t not in index), None)
        if unknown is not None:
            raise DataError(
                f"'{sentences.source}' {sentences.where(i)}: tag '{unknown}' is not among the train tags "
                f"({', '.join(vocab)})"
            )
        out.append([index[t] for t in sent])
    return out


def holdout_split(sentences: TaggedSentences, fraction: float) -> tuple[TaggedSentences, TaggedSentences]:
    """Carve a validation set out of train by a hash of each sentence (stable across runs and sentence order)."""
    val = [hash_fraction(" ".join(w)) < fraction for w in sentences.words]
    return (
        sentences.pick([i for i, v in enumerate(val) if not v]),
        sentences.pick([i for i, v in enumerate(val) if v]),
    )


def cap(sentences: TaggedSentences, n: int | None, seed: int) -> TaggedSentences:
    """The sentences a cap of `n` keeps (`records.capped`: seeded, in file order)."""
    if n is None or n >= len(sentences.words):
        return sentences
    return sentences.pick(capped(len(sentences.words), n, seed))


# ---------------------------------------------------------------- sub-tokens and aligned labels


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list[list[int]]
    """Per sub-token: the word's tag id on its first sub-token, IGNORE elsewhere (specials, later sub-tokens)."""
    cut: int
    """Sentences that lost words to data.max_length."""


def encode_words(tokenizer: Any, words: list[list[str]], tags: list[list[int]] | None, max_length: int) -> Encoded:
    """Sub-token ids of pre-split words (`is_split_into_words`), each word's tag on its first sub-token. `tags` None
    (prediction): the first sub-tokens are marked 0 so the words can be found again."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"token_classification needs a fast tokenizer (word_ids); {type(tokenizer).__name__} is not one"
        )
    ids_out, labels_out, cut = [], [], 0
    for start in range(0, len(words), 1024):
        chunk = words[start : start + 1024]
        enc = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length)
        for j, sent in enumerate(chunk):
            word_ids = enc.word_ids(j)
            tag = tags[start + j] if tags is not None else [0] * len(sent)
            labels, previous = [], None
            for w in word_ids:
                labels.append(IGNORE if w is None or w == previous else tag[w])
                previous = w
            seen = [w for w in word_ids if w is not None]
            cut += bool(seen) and seen[-1] + 1 < len(sent)
            ids_out.append(enc["input_ids"][j])
            labels_out.append(labels)
    return Encoded(ids_out, labels_out, cut)


def first_subtokens(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the positions that carry a word's tag."""
    return labels != IGNORE


class TokenDataset(torch.utils.data.Dataset):
    """Sub-token ids and aligned labels, one tensor each, tokenised once up front."""

    def __init__(self, encoded: Encoded, words: list[list[str]]) -> None:
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded.input_ids]
        self.labels = [torch.tensor(lab, dtype=torch.long) for lab in encoded.labels]
        self.words = words
        self.texts = [" ".join(w) for w in words]  # the report's example inputs
        self.lengths = [len(ids) for ids in encoded.input_ids]
        self.cut = encoded.cut

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def build_dataset(sentences: TaggedSentences, vocab: list[str], tokenizer: Any, max_length: int) -> TokenDataset:
    return TokenDataset(
        encode_words(tokenizer, sentences.words, tag_ids(sentences, vocab), max_length), sentences.words
    )


def cut_note(split: str, dataset: TokenDataset | None, max_length: int) -> str | None:
    """The log line that says how many sentences data.max_length cut (their later words are not scored)."""
    if dataset is None or not dataset.cut:
        return None
    cut = dataset.cut
    return (
        f"{split}: {cut:,} of {len(dataset):,} sentences are longer than data.max_length {max_length} sub-tokens; "
        "their words past it are not trained on or scored"
    )


class TokenCollator:
    """Pads ids with the pad token and labels with IGNORE to the longest sentence in the batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
            labels[row, :n] = it["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
