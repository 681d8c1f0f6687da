"""Token classification from an exported checkpoint: `evaluate` on a CoNLL/JSONL file (seqeval's entity-level
metrics, per entity type, written as metrics.json and predictions.jsonl) and `predict` (each word with its tag and
the entities the tags spell), words tokenised and scored at their first sub-token as in training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.data import tokens as tok
from fulltune.data.text import read_text_file
from fulltune.errors import DataError
from fulltune.eval.metrics import token_metrics
from fulltune.eval.predict import max_length
from fulltune.files.rundir import atomic_output
from fulltune.model.bundle import ModelBundle

WRITTEN = ("metrics.json", "predictions.jsonl")


def evaluate_tokens(
    bundle: ModelBundle,
    cfg: Any,
    data_dir: str | None,
    split: str,
    file: str | None,
    out: Path,
    batch_size: int,
    device: torch.device,
    precision: Any,
    evaluated: dict[str, Any],
) -> dict[str, Any]:
    """Entity-level metrics of a tagger on --file or the split's file in --data_dir (train/val/test.conll, .jsonl)."""
    path = Path(file) if file else (tok.find_split_file(data_dir, split) if data_dir else None)
    if path is None or not path.is_file():
        raise DataError(f"no {split} file in '{data_dir}' (expected {split}.conll/.txt/.jsonl) and no --file")
    labels = bundle.extra["labels"]
    sentences = tok.read_sentences(path, cfg.data)
    dataset = tok.build_dataset(sentences, labels, bundle.tokenizer, cfg.data.max_length)
    if note := tok.cut_note(str(path), dataset, cfg.data.max_length):
        print(note, file=sys.stderr)
    collate = tok.TokenCollator(bundle.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    metrics = token_metrics(bundle.model, loader, labels, device, precision)
    metrics["evaluated"] = evaluated
    with atomic_output(out, "evaluate") as tmp:
        kept = {k: v for k, v in metrics.items() if k not in ("targets", "predictions")}
        (tmp / "metrics.json").write_text(json.dumps(kept | {"labels": labels}, indent=2))
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for words, gold, pred in zip(sentences.words, metrics["targets"], metrics["predictions"], strict=True):
                row = {"words": words[: len(gold)], "tags": gold, "predicted": pred, "correct": gold == pred}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics.update(output_dir=str(out), labels=labels, written=list(WRITTEN))
    return metrics


def entity_table(metrics: dict[str, Any]) -> str:
    """The per-entity-type lines of the terminal table."""
    lines = ["  per entity type:        precision  recall     f1  support"]
    for name, row in (metrics.get("per_entity") or {}).items():
        p, r, f1 = row["precision"], row["recall"], row["f1"]
        lines.append(f"    {name:<22}{p:>9.3f}{r:>8.3f}{f1:>7.3f}{row['support']:>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------- predict


def sentence_inputs(texts: list[str] | None, file: str | None, cfg: DataConfig) -> list[list[str]]:
    """The sentences to tag, as words: each --text split on whitespace; --file a .txt of one sentence per line
    (split on whitespace), a CoNLL file (.conll: the run's token column; tags may be absent) or JSONL (the run's
    tokens field). `cfg` is the run's data section."""
    if texts:
        return [t.split() for t in texts if t.split()] or _no_words()
    if file is None:
        raise DataError("give --text or --file")
    path = Path(file)
    if not path.is_file():
        raise DataError(f"file '{path}' does not exist")
    if path.suffix.lower() == ".txt":
        lines = [line.split() for line in read_text_file(path, cfg.encoding).splitlines() if line.split()]
        return lines or _no_words(path)
    return tok.read_sentences(path, cfg, need_tags=False).words


def _no_words(path: Path | None = None) -> list[list[str]]:
    raise DataError(f"file '{path}' holds no words" if path else "--text holds no words")


@torch.no_grad()
def tag_sentences(bundle: ModelBundle, sentences: list[list[str]], batch_size: int = 32) -> list[list[str | None]]:
    """Each word's predicted tag (the argmax at its first sub-token); None for words past data.max_length."""
    model, device = bundle.model, next(bundle.model.parameters()).device
    id2label = model.config.id2label
    length = max_length(bundle)  # where training cut them
    encoded = tok.encode_words(bundle.tokenizer, sentences, None, length)
    dataset = tok.TokenDataset(encoded, sentences)
    collate = tok.TokenCollator(bundle.tokenizer.pad_token_id)
    out: list[list[str | None]] = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        first = tok.first_subtokens(batch.pop("labels"))  # (batch, seq)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (batch, seq, num_tags)
        for row, keep in zip(logits.argmax(-1).cpu(), first, strict=True):
            out.append([id2label[int(i)] for i in row[keep]])
    if encoded.cut:
        print(
            f"{encoded.cut} sentence(s) longer than data.max_length {length} sub-tokens: words past it get no tag",
            file=sys.stderr,
        )
    return [tags + [None] * (len(words) - len(tags)) for words, tags in zip(sentences, out, strict=True)]


def tagged_row(words: list[str], tags: list[str | None]) -> dict[str, Any]:
    """predict's line for one sentence: the words, their tags, and the entities (seqeval's reading of the tags)."""
    from seqeval.metrics.sequence_labeling import get_entities

    spans = get_entities([t or "O" for t in tags])
    entities = [{"type": k, "text": " ".join(words[a : b + 1]), "start": a, "end": b + 1} for k, a, b in spans]
    return {"input": " ".join(words), "words": words, "tags": tags, "entities": entities}
